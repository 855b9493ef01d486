"""Artifact stamps: a result on disk is reused only if it provably came from the same
settings and inputs.

Every output a later run reuses (checkpoints and exported models, label chunks,
switchers, operating points, adaptation streams) is written next to a *stamp*: the subset
of the config that determines it and the fingerprints of its inputs (models, labels,
the prepared dataset). A job starting on a directory compares the stamp it would write
with the one there:

- none there and nothing else: a fresh start, the stamp is written first (so a killed
  run that resumes finds its own stamp);
- equal: the results on disk are reused or resumed;
- different (or results without a stamp, from an older dmd_jax): one error naming the
  differing keys, old and new values, and the fix: a fresh workdir, or
  `--config.overwrite=True`, which deletes those results and recomputes them.

Stamps are plain JSON; the comparison is on their canonical JSON form.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from dmd_jax import files, parallel, reporting
from dmd_jax.errors import UserError

STAMP_FILE = "stamp.json"
_SHOWN = 6  # differing keys named in an error


class StaleArtifactError(UserError, ValueError):
    """Results on disk were made with other settings or inputs than this run's."""


def make(settings: Mapping[str, Any], inputs: Mapping[str, Any] | None = None,
         version: int = 1) -> dict[str, Any]:
    """A stamp: `settings` (config values) and `inputs` (fingerprints), as plain JSON.

    `version` is the job's computation version (its `STAMP_VERSION`): a job whose results
    would change for the same settings and inputs (a fixed bug, a new graph) bumps it, so
    results made by the older code are refused instead of reused. Version 1 is written as
    no field at all, so stamps made before versions existed are version 1."""
    stamp = {"settings": settings, "inputs": dict(inputs or {})}
    if version != 1:
        stamp["version"] = int(version)
    return canonical(stamp)


def canonical(value: Any) -> Any:
    """`value` as it reads back from JSON (ConfigDicts and tuples become dicts and lists)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=_plain))


def digest(stamp: Mapping[str, Any]) -> str:
    """A short hash of a stamp: the identity of what it describes, for stamps downstream."""
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in old:
                out.append(f"{name}: (absent) -> {_short(new[key])}")
            elif key not in new:
                out.append(f"{name}: {_short(old[key])} -> (absent)")
            else:
                out.extend(differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {_short(old)} -> {_short(new)}"]


def check(old: Mapping[str, Any] | None, new: Mapping[str, Any], what: str, where: str,
          overwrite: bool, has_results: bool) -> bool:
    """Whether results stamped `old` may stand for `new`: True to reuse them, False to
    (re)compute them (nothing there, or `overwrite`); raises StaleArtifactError otherwise.
    Decided on the main host and shared, so every host takes the same branch."""
    verdict = 0  # 0: reuse, 1: compute, 2: refuse
    message = ""
    if parallel.is_main_process():
        if old is None and not has_results:
            verdict = 1
        elif old is not None and canonical(old) == canonical(new):
            verdict = 0
        elif overwrite:
            verdict = 1
        else:
            verdict = 2
            if old is None:
                message = ("were made by an older dmd_jax that wrote no stamp, so nothing "
                           "proves they match this run")
            else:
                diffs = differences(canonical(old), canonical(new))
                shown = "; ".join(diffs[:_SHOWN]) + ("; ..." if len(diffs) > _SHOWN else "")
                message = f"were made with other settings or inputs ({shown})"
    verdict = int(parallel.broadcast_from_main(np.asarray(verdict)))
    if verdict == 2:
        raise StaleArtifactError(
            f"the {what} in {where} {message or '(see the main host)'}. Use a fresh --workdir, "
            "or rerun with --config.overwrite=True to delete and recompute them.")
    return verdict == 0


def claim(directory: str, stamp: Mapping[str, Any], what: str, overwrite: bool,
          has_results: bool, clear: Callable[[], None]) -> bool:
    """`check` against `directory/stamp.json`; before computing, `clear()`s stale results
    (on `overwrite`) and writes the new stamp. True: the results there are this run's."""
    path = files.path(directory) / STAMP_FILE
    old = read(path)
    reuse = check(old, stamp, what, str(directory), overwrite, has_results)
    if not reuse:
        if old is not None or has_results:
            reporting.log(f"[stamps] {what} in {directory} were made with other settings; "
                          "overwrite=True: deleting and recomputing them")
            clear()
        files.write_json(path, canonical(stamp))
    parallel.barrier("stamp claimed")
    return reuse


def read(path: Any) -> dict[str, Any] | None:
    """The stamp in a file, or None if there is none (main host only: others get None)."""
    if not parallel.is_main_process() or not files.exists(path):
        return None
    return files.read_json(path)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if isinstance(x, ml_collections.ConfigDict):
        return x.to_dict()
    raise TypeError(f"not a stamp value: {type(x)}")
