"""Host batches on grain: random access by index, decoding in worker processes.

Every batch is a pure function of its position (`grain.MapDataset` over step numbers or
batch starts), so the batches do not depend on how many workers make them: `workers=0`
loads on threads of this process, `workers=N` in N spawned processes (each holding its
own reader of the prepared dataset), and both give the same batches in the same order.
What a batch holds is `dmd_jax.data.pipeline`'s rule: the global batch at step `s` is
rows `s*B .. (s+1)*B` of per-epoch permutations, each host loading only its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import grain
from absl import flags
import numpy as np

from dmd_jax.data import pipeline

READ_THREADS = 2  # in-process loading (workers=0): batches decoded ahead, in order
WORKER_BUFFER = 2  # batches each worker process keeps ready


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
    """This host's rows of the training batch at a step (picklable, for the workers)."""

    split: pipeline.Split
    global_batch: int
    seed: int
    rows: slice

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        positions = np.arange(self.global_batch)[self.rows]
        indices = pipeline.train_indices(len(self.split), self.global_batch, int(step),
                                         self.seed, self.rows)
        return self.split.train_rows(indices, self.seed, int(step), positions)


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
    """This host's rows of the evaluation batch starting at a clip; padded past `stop`."""

    split: pipeline.Split
    global_batch: int
    rows: slice
    stop: int

    def __call__(self, first: int) -> dict[str, np.ndarray]:
        positions = np.arange(first, first + self.global_batch)[self.rows]
        batch = self.split.rows(np.minimum(positions, self.stop - 1))
        batch["mask"] = positions < self.stop
        return batch


@dataclasses.dataclass(frozen=True)
class _IndexBatch:
    split: pipeline.Split

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.split.rows(indices)


def train_batches(split: pipeline.Split, global_batch: int, start_step: int, stop_step: int, seed: int,
                  rows: slice, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of the training batches at steps `start_step .. stop_step - 1`:
    one random view per clip (`Split.train_rows`)."""
    steps = grain.MapDataset.range(start_step, stop_step)
    return _iterate(steps.map(_TrainBatch(split, global_batch, seed, rows)), workers)


def eval_batches(split: pipeline.Split, global_batch: int, rows: slice, start: int = 0,
                 stop: int | None = None, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One pass over clips `start..stop` in order, in their evaluation views; the last
    batch is padded, `mask` marks the real rows."""
    stop = len(split) if stop is None else min(stop, len(split))
    firsts = grain.MapDataset.range(start, stop, global_batch)
    return _iterate(firsts.map(_EvalBatch(split, global_batch, rows, stop)), workers)


def index_batches(split: pipeline.Split, batches: Sequence[np.ndarray],
                  workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `split` at each given array of indices, in order (a stream's batches)."""
    return _iterate(grain.MapDataset.source(list(batches)).map(_IndexBatch(split)), workers)


def _iterate(batches: grain.MapDataset, workers: int) -> Iterator[dict[str, np.ndarray]]:
    if workers < 0:
        raise ValueError(f"config.data.workers={workers} must be >= 0")
    if workers == 0:
        options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_THREADS)
        iterator = iter(batches.to_iter_dataset(options))
    else:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a script may not parse them
            flags.FLAGS.mark_as_parsed()
        # One decoding thread per worker process (grain's default is 16 threads reading
        # 500 elements ahead in each): `workers` is the number of cores the loader takes.
        per_worker = grain.ReadOptions(num_threads=1, prefetch_buffer_size=WORKER_BUFFER)
        iterator = iter(batches.to_iter_dataset(per_worker).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=WORKER_BUFFER)))
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops the worker processes now, not at garbage collection
