"""Test streams under distribution shift: which clip comes when, under which corruption.

A stream is a sequence of `(clip, corruption, severity)` rows, read in fixed-size batches:

- `reset`: one stream per corruption x severity (the models are reset for each);
- `continual`: one stream through every corruption x severity in turn, never reset;
- `mixed`: every row of `continual`, shuffled together.

Clips are read on each host (its rows of the global batch) and corrupted on the device,
each with a key derived from `(seed, corruption, severity, clip id)`, so a clip looks
the same whatever batch, device or host it lands on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import parallel
from dmd_jax.data import corruptions, pipeline
from dmd_jax.errors import ConfigValueError

PROTOCOLS = ("reset", "continual", "mixed")


@dataclasses.dataclass(frozen=True)
class Stream:
    name: str  # e.g. 'fog@5' (reset), 'continual', 'mixed'
    clip: np.ndarray  # (N,) row of the split
    corruption: np.ndarray  # (N,) index into `corruption_names`
    severity: np.ndarray  # (N,) 1-5
    corruption_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.clip)

    def row_names(self) -> np.ndarray:
        """`corruption@severity` of every row."""
        names = np.asarray(self.corruption_names)[self.corruption]
        return np.char.add(np.char.add(names, "@"), self.severity.astype(str))


def clip_order(num_clips: int, batch_size: int, seed: int) -> np.ndarray:
    """The split's rows in the order every stream meets them: shuffled once with `seed`,
    cut to whole batches (so every batch, and every normalisation statistic, is full)."""
    usable = num_clips - num_clips % batch_size
    if usable == 0:
        raise ConfigValueError(f"the stream split has {num_clips} clips, fewer than one batch "
                         f"of {batch_size}; lower config.adapt.batch_size")
    return np.random.default_rng(seed).permutation(num_clips)[:usable]


def make_streams(protocol: str, num_clips: int, corruption_names: tuple[str, ...],
                 severities: tuple[int, ...], batch_size: int, seed: int) -> list[Stream]:
    """The streams of `protocol` over `num_clips` clips (shuffled once, with `seed`).

    Each corruption sees the clips in the same order (`clip_order`).
    """
    if protocol not in PROTOCOLS:
        raise ConfigValueError(f"unknown adapt protocol {protocol!r}; use one of {PROTOCOLS}")
    for name in corruption_names:
        if name not in corruptions.CORRUPTIONS:
            raise ConfigValueError(f"unknown corruption {name!r}; available: "
                             f"{sorted(corruptions.CORRUPTIONS)}")
    order = clip_order(num_clips, batch_size, seed)
    usable = len(order)
    segments = [Stream(f"{name}@{severity}", order, np.full(usable, c), np.full(usable, severity),
                       corruption_names)
                for severity in severities for c, name in enumerate(corruption_names)]
    if protocol == "reset":
        return segments
    joined = Stream(protocol, *(np.concatenate([getattr(s, f) for s in segments])
                                for f in ("clip", "corruption", "severity")), corruption_names)
    if protocol == "mixed":
        shuffle = np.random.default_rng([seed, 1]).permutation(len(joined))
        joined = dataclasses.replace(joined, clip=joined.clip[shuffle],
                                     corruption=joined.corruption[shuffle],
                                     severity=joined.severity[shuffle])
    return [joined]


class StreamReader:
    """Global batches of a stream: uint8 clips corrupted on the device, and their rows."""

    def __init__(self, split: pipeline.Split, batch_size: int, mesh, seed: int):
        self.split, self.batch_size, self._mesh, self._seed = split, batch_size, mesh, seed
        self._rows = parallel.host_slice(batch_size)

    def batches(self, stream: Stream) -> Iterator[tuple[jax.Array, dict[str, np.ndarray]]]:
        """`(corrupted clips on the mesh, {label, id, corruption, severity})` per batch."""
        starts = range(0, len(stream), self.batch_size)
        loaded = pipeline.prefetch(self.split.rows(stream.clip[s:s + self.batch_size][self._rows])
                                   for s in starts)
        for start, host in zip(starts, loaded):
            rows = slice(start, start + self.batch_size)
            info = parallel.gather_host_rows({k: host[k] for k in ("label", "id")})
            info.update(corruption=stream.corruption[rows], severity=stream.severity[rows])
            clips = parallel.to_global(host["video"], self._mesh)
            yield self._corrupt(clips, info, stream.corruption_names), info

    def _corrupt(self, clips: jax.Array, info: dict[str, np.ndarray],
                 names: tuple[str, ...]) -> jax.Array:
        """Each row under its own corruption: every corruption present in the batch is
        applied to the whole (fixed-shape) batch and its rows are selected."""
        out = clips
        ids = parallel.to_global(info["id"][self._rows], self._mesh)
        for c, severity in sorted(set(zip(info["corruption"].tolist(),
                                          info["severity"].tolist()))):
            rows = (info["corruption"] == c) & (info["severity"] == severity)
            mask = parallel.to_global(rows[self._rows], self._mesh)
            out = _apply(out, clips, ids, mask, names[c], severity, self._seed)
        return out


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _apply(out: jax.Array, clips: jax.Array, ids: jax.Array, mask: jax.Array, name: str,
           severity: int, seed: int) -> jax.Array:
    corrupted = corruptions.corrupt_clips(clips, ids, name, severity, seed)
    return jnp.where(mask[:, None, None, None, None], corrupted, out)
