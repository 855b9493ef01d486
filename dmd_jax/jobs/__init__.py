"""The jobs: each a module with `run(config, workdir) -> summary` and `SECTIONS`, the
config sections it reads (besides the run-wide `job`, `seed`, `num_devices`, `overwrite`).

`config.job` names a job; `module(job)` imports it on demand (so `--help` stays fast).
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable

# config.job -> the module implementing it.
JOBS = {"train": "train", "label": "label", "train_switcher": "switcher",
        "evaluate_hybrid": "hybrid", "adapt": "adapt", "pipeline": "pipeline", "serve": "serve",
        "link": "link", "export_edge": "export_edge", "evaluate_cascade": "cascade"}


def module(job: str) -> types.ModuleType:
    return importlib.import_module(f"{__name__}.{JOBS[job]}")


def entry(name: str, sections: tuple[str, ...], keys: dict[str, tuple[str, ...]]):
    """Decorates a job's `run(config, workdir)`: the config is checked against the
    sections and keys the job reads before anything is written, then the workdir is
    created, proven writable and owned by this process while the job runs."""
    from dmd_jax import config_utils, files

    def decorate(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(run)
        def checked(config, workdir: str) -> dict[str, Any]:
            config_utils.check_sections(config, name, sections, keys=keys)
            files.ensure_workdir(workdir)
            with files.workdir_lock(workdir):
                return run(config, workdir)
        return checked
    return decorate
