"""Every file dmd_jax writes or reads back, on local disk or in a bucket (`gs://...`).

Paths go through `etils.epath`, so a workdir or data dir can be a Cloud Storage URL (what
Cloud TPU users use) as well as a local folder. Writers are safe on a pod and after a kill:

- only the main host writes (other hosts would write the same bytes, and race);
- a local file is written to a uniquely named temporary file in the same folder, synced,
  then renamed over the target, so readers see the old file or the new one, never half;
  an object store writes whole objects atomically by itself;
- new files get the user's umask (a team's shared workdir stays readable), not the
  0600 of temporary files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import tempfile
import time
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath

from dmd_jax import parallel
from dmd_jax.errors import UserError

PathLike = str | os.PathLike | epath.Path


class WorkdirError(UserError, OSError):
    """The workdir cannot be created or written."""


class CorruptFileError(UserError, ValueError):
    """A file dmd_jax wrote earlier cannot be read back."""


def path(p: PathLike) -> epath.Path:
    return epath.Path(p)


def is_local(p: PathLike) -> bool:
    return "://" not in os.fspath(p)


def ensure_workdir(workdir: PathLike) -> None:
    """Creates the workdir and proves it writable before any work is done (main host)."""
    if not parallel.is_main_process():
        return
    target = path(workdir)
    probe = target / f".write_probe_{os.getpid()}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(
            f"workdir {os.fspath(workdir)!r} is not writable ({err.strerror or err}); pass a "
            "--workdir you can write to") from err


class WorkdirInUseError(UserError, RuntimeError):
    """Another process is running a job in this workdir."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: PathLike) -> Iterator[None]:
    """Owns `workdir` for one process while a job runs (the main host's; other hosts of a
    pod run the same job): a second job there stops at once instead of corrupting the
    first one's files. A lock left by a process that died on this machine is taken over
    with a warning; one from another machine names its owner and how to clear it."""
    if not parallel.is_main_process():
        yield
        return
    lock = path(workdir) / LOCK_FILE
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    _claim(lock, owner)
    try:
        yield
    finally:
        if lock.exists() and _read_owner(lock) == owner:
            lock.unlink()


def _claim(lock: epath.Path, owner: dict[str, Any]) -> None:
    text = json.dumps(owner)
    if is_local(lock):
        while True:
            try:
                fd = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                _refuse_or_clear(lock)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return
    if lock.exists():  # buckets: no exclusive create here; a check, then the write
        _refuse_or_clear(lock)
    lock.write_text(text)


def _refuse_or_clear(lock: epath.Path) -> None:
    """Raises if the lock's owner may be alive; removes a lock its dead owner left."""
    other = _read_owner(lock)
    if other and other.get("host") == socket.gethostname() and not _alive(other.get("pid")):
        logging.warning("workdir lock %s was left by process %s, which is gone; taking it over",
                        lock, other.get("pid"))
        lock.unlink()
        return
    who = (f"process {other.get('pid')} on {other.get('host')} (since "
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(other.get('since', 0)))})"
           if other else "another process")
    raise WorkdirInUseError(
        f"workdir {os.fspath(lock.parent)!r} is in use by {who}: wait for that job, use another "
        f"--workdir, or, if that process no longer runs, delete {os.fspath(lock)}")


def _read_owner(lock: epath.Path) -> dict[str, Any] | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or an unreadable pid: assume alive
    return True


def write_bytes(target: PathLike, data: bytes) -> None:
    """Writes `data` to `target` atomically (main host only)."""
    if not parallel.is_main_process():
        return
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(target):
        target.write_bytes(data)  # an object appears whole or not at all
        return
    folder = os.fspath(target.parent)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".tmp",
                                     delete=False) as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError as err:  # e.g. no space left: nothing half-written stays behind
            f.close()
            os.unlink(f.name)
            raise WorkdirError(f"cannot write {os.fspath(target)} ({err.strerror or err}); "
                               "the previous version, if any, is untouched: free space or "
                               "fix the folder and run again") from err
    os.chmod(f.name, 0o666 & ~_umask())
    os.replace(f.name, os.fspath(target))


def write_text(target: PathLike, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: PathLike, data: Mapping[str, Any]) -> None:
    """Strict JSON (NaN, e.g. an undefined PGR, is written as null), sorted keys."""
    text = json.dumps(_nan_to_none(data), indent=2, sort_keys=True, default=_jsonable,
                      allow_nan=False)
    write_text(target, text + "\n")


def read_json(source: PathLike) -> Any:
    try:
        return json.loads(path(source).read_text())
    except ValueError as err:
        raise CorruptFileError(f"{os.fspath(source)} is not valid JSON ({err}); it was damaged "
                               "after it was written: remove it and rerun the job that "
                               "writes it") from err


def save_npz(target: PathLike, /, **arrays: np.ndarray) -> None:
    """Per-clip arrays behind a reported figure, written atomically (main host only)."""
    if not parallel.is_main_process():
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(target, buffer.getvalue())


def load_npz(source: PathLike) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, read into memory."""
    with path(source).open("rb") as f:
        with np.load(io.BytesIO(f.read())) as npz:
            return {k: npz[k] for k in npz.files}


def walk_files(root: PathLike):
    """Every file under `root`, recursively (epath's rglob refuses buckets)."""
    for child in sorted(path(root).iterdir()):
        if child.is_dir():
            yield from walk_files(child)
        else:
            yield child


def exists(p: PathLike) -> bool:
    return path(p).exists()


def remove(target: PathLike) -> None:
    """Deletes a file if present (main host only)."""
    if parallel.is_main_process():
        target = path(target)
        if target.exists():
            target.unlink()


def remove_tree(target: PathLike) -> None:
    """Deletes a folder and everything in it, if present (main host only)."""
    if parallel.is_main_process():
        target = path(target)
        if target.exists():
            target.rmtree()


def save_figure(fig: Any, target: PathLike, dpi: int = 120) -> None:
    """Writes a matplotlib figure as a PNG (main host only) and closes it."""
    if parallel.is_main_process():
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        write_bytes(target, buffer.getvalue())
    import matplotlib.pyplot as plt
    plt.close(fig)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
        return None
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")
