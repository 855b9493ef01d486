"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

A checkpoint is a step directory holding two items: `state` (any pytree of arrays,
saved with orbax's pytree handler) and `meta` (JSON: what a resumed run must check or restore,
e.g. the data position). Orbax writes each step to a temporary directory and renames
it when complete, so a job killed mid-save leaves no half-written step behind. A step
that is present but unreadable (a damaged disk, a file truncated by hand) on any host is
moved aside to `<directory>.damaged/` with a warning (never deleted) and the previous step
is used instead, on every host alike; the run then saves that step again, so the next
resume is clean.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dmd_jax import files, parallel
from dmd_jax.errors import UserError


# Orbax saves a replicated array "replica-parallel" by default: each replica writes a
# slice of it, cut by an eager `lax.slice` that compiles once per array shape, so the first
# save of a train state with a hundred parameter shapes spent ~7 s compiling slices (8 CPU
# devices) for arrays of a few kilobytes. Slicing only pays off for large arrays.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, replica-parallel only for arrays of >= 4 MiB per replica."""
    handlers = ocp.type_handlers
    scalar = handlers.ScalarHandler()
    # Orbax's default handlers, except jax.Array's: the slicing threshold, and no per-host
    # array metadata files (every restore here names its shardings).
    registry = handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, handlers.NumpyHandler()), (str, handlers.StringHandler()),
        (jax.Array, handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _resolved(path: str) -> epath.Path:
    """An absolute path (orbax needs one); bucket URLs are left as they are."""
    return epath.Path(path).absolute() if files.is_local(path) else epath.Path(path)


def save_tree(path: str, tree: Any) -> None:
    """Writes a pytree of arrays to `path` (a directory; replaced if present). Every host
    takes part; orbax coordinates them."""
    with ocp.Checkpointer(_pytree_handler()) as saver:
        saver.save(_resolved(path), args=ocp.args.PyTreeSave(tree), force=True)


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint that does not fit the model: resuming it would be wrong, not slow."""


def shapes(tree: Any) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def check_compatible(saved: dict[str, list[int]], target: Any, directory: str) -> None:
    """Raises one clear error naming the first parameter whose shape differs."""
    wanted = shapes(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        raise CheckpointMismatchError(
            f"checkpoint in {directory} has a different structure from this model "
            f"(missing: {missing[:3]}, unexpected: {extra[:3]}). It was written by another "
            "model config: use a fresh --workdir, or restore the config it was written with.")
    for key, shape in wanted.items():
        if list(saved[key]) != list(shape):
            raise CheckpointMismatchError(
                f"checkpoint in {directory}: parameter {key.lstrip('.')} has shape {tuple(saved[key])} "
                f"but this model expects {tuple(shape)}. It was written by another model config: "
                "use a fresh --workdir, or restore the config it was written with.")


def restore_everywhere(path: str, abstract: Any) -> Any:
    """Restores the arrays at `path`, replicated on every device of this job, whatever
    topology saved them: a model exported by one process is used by a pod's many.
    (Restoring without shardings makes orbax reuse the saved ones, which fails on a
    different device count.) `abstract`: the tree's shapes and dtypes."""
    sharding = parallel.replicated(parallel.make_mesh())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
    with ocp.Checkpointer(_pytree_handler()) as restorer:
        return restorer.restore(_resolved(path), args=_restore_args(target))


class Checkpointer:
    """Saves every `save` asynchronously; restores the newest readable step."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = str(_resolved(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _pytree_handler(), "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        meta = {**meta, "step": int(step), "shapes": shapes(state)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """`(state, meta)` of the newest readable step shaped like `target`, or None.

        `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings):
        restored arrays land directly with those shardings.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.steps()):
            meta = self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"])
            if meta is None:
                continue
            check_compatible(meta.get("shapes", {}), target, self.directory)
            state = self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(
                state=_restore_args(abstract)))["state"])
            if state is not None:
                return state, meta
        return None

    def _read(self, step: int, read) -> Any:
        """`read()`'s result if it succeeded on every host; else the step is set aside on
        all of them alike (the decision is shared, or the hosts would resume apart)."""
        try:
            result, error = read(), None
        except Exception as err:  # noqa: BLE001 - any failure means unreadable
            result, error = None, err
        if parallel.all_hosts_agree(error is None):
            return result
        logging.warning("checkpoint step %d in %s is unreadable (%s); moving it aside to %s "
                        "and trying the previous one", step, self.directory,
                        error or "on another host", self.damaged_directory)
        self._set_aside(step)
        return None

    @property
    def damaged_directory(self) -> str:
        return self.directory.rstrip("/") + ".damaged"

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable step out of the way (main host), so that the run can write
        that step again and the next resume does not fall back once more."""
        if parallel.is_main_process():
            source = epath.Path(self.directory) / str(step)
            target = epath.Path(self.damaged_directory) / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        parallel.barrier(f"checkpoint step {step} set aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
