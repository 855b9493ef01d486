"""The jobs: each a module with `run(config, workdir) -> summary` and `SECTIONS`, the
config sections it reads (besides the run-wide `job`, `seed`, `num_devices`, `overwrite`).

`config.job` names a job; `module(job)` imports it on demand (so `--help` stays fast).
"""

from __future__ import annotations

import importlib
import types

# config.job -> the module implementing it.
JOBS = {"train": "train", "label": "label", "train_switcher": "switcher",
        "evaluate_hybrid": "hybrid", "adapt": "adapt", "pipeline": "pipeline"}


def module(job: str) -> types.ModuleType:
    return importlib.import_module(f"{__name__}.{JOBS[job]}")
