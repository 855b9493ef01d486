"""Loading `configs/<file>.py[:arg]` and explaining bad overrides and bad input."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Any, Callable

import ml_collections

from dmd_jax.errors import UserError


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> `get_config(arg)`, as ml_collections' config_flags does."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(f"config file {path!r} does not exist (the path is "
                                      f"relative to {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location("_dmd_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of a config, nested ones included."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, f"{prefix}{key}."))
    return keys


def unknown_override(argv: list[str]) -> str | None:
    """Names the first `--config.KEY=...` whose KEY the config lacks, with the nearest keys."""
    spec = _flag_value(argv, "config")
    if spec is None:
        return None
    try:
        keys = flat_keys(load_config(spec))
    except Exception:  # noqa: BLE001 - then absl's own message is the best we have
        return None
    for arg in argv[1:]:
        match = re.match(r"--config\.([\w.]+)", arg)
        if match and match.group(1) not in keys:
            key = match.group(1)
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
            return f"unknown config key {key!r} (from {arg!r}) in {spec}{hint}"
    return None


def missing_config_file(argv: list[str]) -> str | None:
    """Says so when `--config` names a file that does not exist (absl would fail later,
    inside a traceback)."""
    spec = _flag_value(argv, "config")
    if spec is None:
        return None
    path = spec.partition(":")[0]
    if os.path.isfile(path):
        return None
    return f"config file {path!r} does not exist (relative to {os.getcwd()})"


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


RUN_KEYS = ("job", "seed", "num_devices", "overwrite")  # what every job takes


class ConfigFileNotFoundError(UserError, FileNotFoundError):
    """--config names a file that does not exist."""


class ConfigSectionError(UserError, ValueError):
    """A config holds sections its job does not read, or lacks ones it does."""


def check_sections(config: ml_collections.ConfigDict, job: str, sections: tuple[str, ...],
                   where: str = "config", keys: dict[str, tuple[str, ...]] | None = None) -> None:
    """The config of `job` has exactly its `sections` (and the run-wide keys), and each
    section in `keys` exactly those keys: a setting no job reads would be silently
    ignored, so it is an error, as is a missing one."""
    present = set(config.keys())
    missing = [s for s in sections if s not in present]
    extra = sorted(present - set(sections) - set(RUN_KEYS))
    if missing:
        unread = f", and its {', '.join(extra)} would go unread" if extra else ""
        raise ConfigSectionError(
            f"{where} has no section {missing[0]!r}, which the {job!r} job reads (it reads "
            f"{', '.join(sections)}){unread}: use a config variant made for that job (e.g. "
            "configs/demo.py:label for the label job) rather than changing config.job")
    if extra:
        raise ConfigSectionError(
            f"{where}.{extra[0]} is not read by the {job!r} job (it reads "
            f"{', '.join(sections)}): remove it, or run the job that reads it (e.g. the "
            "config variant of that stage)")
    for section, allowed in (keys or {}).items():
        check_keys(config[section], allowed, f"{where}.{section}", f"the {job!r} job")


def check_keys(section: ml_collections.ConfigDict, allowed: tuple[str, ...], where: str,
               reader: str) -> None:
    """`section` has exactly the keys `allowed` (what `reader` reads)."""
    present = set(section.keys())
    extra, missing = sorted(present - set(allowed)), sorted(set(allowed) - present)
    if extra:
        near = difflib.get_close_matches(extra[0], allowed, n=2, cutoff=0.5)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigSectionError(f"{where}.{extra[0]} is not a setting {reader} reads{hint}; "
                                 f"it reads {', '.join(allowed)}")
    if missing:
        raise ConfigSectionError(f"{where} lacks {', '.join(missing)}, which {reader} reads; "
                                 "start from a config variant that has them")


def run_with_clear_errors(fn: Callable[[], Any]) -> Any:
    """Runs `fn`; a UserError ends the process with its one-line message (exit code 2)."""
    try:
        return fn()
    except UserError as err:
        if os.environ.get("DMD_TRACEBACK"):
            raise
        sys.exit(f"error: {err}")
