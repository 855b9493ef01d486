"""Entry point: `python -m dmd_jax.main --config configs/<file>.py[:arg] --workdir DIR`.

`config.job` names the job; each job module has `run(config, workdir) -> summary`.
Config overrides are `--config.key=value`; an unknown key stops with the nearest
valid ones.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dmd_jax import config_utils, parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/<file>.py[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and summaries go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    from dmd_jax import jobs  # here, so that `--help` stays fast

    if config.job not in jobs.JOBS:
        raise app.UsageError(f"config.job={config.job!r} is not a job; available: "
                             f"{sorted(jobs.JOBS)}")
    job = jobs.module(config.job)
    config_utils.check_sections(config, config.job, job.SECTIONS, keys=job.KEYS)  # before any host starts
    parallel.maybe_initialize_distributed()
    job.run(config, _WORKDIR.value)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a missing config file and unknown config keys reported
    as one clear line."""
    missing = config_utils.missing_config_file(argv)
    if missing:
        sys.exit(f"error: {missing}")
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - ml_collections raises AttributeError, absl Error
        problem = config_utils.unknown_override(argv)
        if problem is None and not isinstance(err, (flags.Error, ValueError)):
            raise  # a bug, not bad input: keep the traceback
        # absl embeds the config file's traceback in its message: its last line says it all.
        sys.exit(f"error: {problem or str(err).strip().splitlines()[-1]}")


def run() -> None:
    config_utils.run_with_clear_errors(lambda: app.run(main, flags_parser=parse_flags))


if __name__ == "__main__":
    run()
