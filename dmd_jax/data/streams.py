"""Test streams under distribution shift: which clip comes when, under which corruption.

A stream is a sequence of `(clip, corruption, severity)` rows, read in fixed-size batches.
The protocols are the online test-time adaptation benchmarks' (Wang et al.'s CoTTA,
Döbler et al.'s test-time-adaptation benchmark):

- `reset`: one stream per corruption x severity (the models are reset for each);
- `continual`: one stream through every corruption x severity in turn, never reset;
- `gradual`: one stream, never reset, through every corruption with the severity rising
  and falling along `severities` (1, 2, 3, 4, 5 gives 1→5→1 per corruption);
- `mixed`: every row of `continual`, shuffled together;
- `correlated[:DELTA]`: as `reset`, with the clips in a class-correlated order: the
  stream is cut into one chunk per class and each class's clips are shared out over the
  chunks by a Dirichlet draw of concentration DELTA (0.1 unless given; small: each chunk
  holds few classes, each in one run), as NOTE (Gong et al. 2022) and the benchmarks built
  on it do. Label shift over time: where Tent is known to collapse and LAME and ROID are
  built to hold.

Every segment (one corruption at one severity) shows each clip once; every protocol meets
the same clips (the split shuffled once with the seed and cut to whole batches). Clips are
read on each host (its rows of the global batch) and corrupted on the device, each with a
key derived from `(seed, corruption, severity, clip id)`, so a clip looks the same
whatever batch, device or host it lands on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import parallel
from dmd_jax.data import corruptions, host_corruptions, loader, pipeline
from dmd_jax.errors import ConfigValueError

PROTOCOLS = ("reset", "continual", "gradual", "mixed", "correlated")
DEFAULT_DIRICHLET = 0.1  # RoTTA's and ROID's correlated benchmarks


@dataclasses.dataclass(frozen=True)
class Stream:
    name: str  # e.g. 'fog@5' (reset, correlated), 'continual', 'gradual', 'mixed'
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


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A parsed `config.adapt.protocol`: its name and, for `correlated`, the Dirichlet
    concentration."""

    name: str
    dirichlet: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "Protocol":
        name, _, arg = spec.partition(":")
        if name not in PROTOCOLS:
            raise ConfigValueError(f"unknown adapt protocol {spec!r}; use one of {PROTOCOLS} "
                                   "(correlated takes a concentration: 'correlated:0.1')")
        if name != "correlated":
            if arg:
                raise ConfigValueError(f"adapt protocol {name!r} takes no argument (got {spec!r})")
            return cls(name)
        try:
            delta = float(arg) if arg else DEFAULT_DIRICHLET
        except ValueError:
            delta = -1.0
        if not delta > 0:
            raise ConfigValueError(f"adapt protocol {spec!r}: the Dirichlet concentration must "
                                   "be a positive number, e.g. 'correlated:0.1'")
        return cls(name, delta)

    @property
    def resets_per_segment(self) -> bool:
        """Whether each corruption x severity is a stream of its own (models reset)."""
        return self.name in ("reset", "correlated")

    @property
    def folder(self) -> str:
        """The workdir folder of its streams ('correlated-0.1')."""
        return self.name if self.dirichlet is None else f"{self.name}-{self.dirichlet:g}"


def clip_order(num_clips: int, batch_size: int, seed: int) -> np.ndarray:
    """The split's rows in the order every stream meets them: shuffled once with `seed`,
    cut to whole batches (so every batch, and every normalisation statistic, is full)."""
    usable = num_clips - num_clips % batch_size
    if usable == 0:
        raise ConfigValueError(f"the stream split has {num_clips} clips, fewer than one batch "
                         f"of {batch_size}; lower config.adapt.batch_size")
    return np.random.default_rng(seed).permutation(num_clips)[:usable]


def make_streams(protocol: Protocol, labels: np.ndarray, corruption_names: tuple[str, ...],
                 severities: tuple[int, ...], batch_size: int, seed: int) -> list[Stream]:
    """The streams of `protocol` over a split whose clips have these `labels` (only
    `correlated` looks at them), shuffled once with `seed`."""
    for name in corruption_names:
        if name not in corruptions.ALL_CORRUPTIONS:
            raise ConfigValueError(f"unknown corruption {name!r}; available: "
                             f"{sorted(corruptions.ALL_CORRUPTIONS)}")
    order = clip_order(len(labels), batch_size, seed)
    if protocol.name == "correlated":
        order = correlated_order(order, labels[order], protocol.dirichlet, seed)
    if protocol.name == "gradual":
        if len(severities) < 2:
            raise ConfigValueError(
                "the gradual protocol walks the severities up and down: give at least two "
                f"in config.adapt.severities (e.g. (1, 2, 3, 4, 5)), not {tuple(severities)}")
        ramp = (*severities, *severities[-2::-1])
        pairs = [(c, s) for c in range(len(corruption_names)) for s in ramp]
    else:
        pairs = [(c, s) for s in severities for c in range(len(corruption_names))]
    segments = [Stream(f"{corruption_names[c]}@{s}", order, np.full(len(order), c),
                       np.full(len(order), s), corruption_names) for c, s in pairs]
    if protocol.resets_per_segment:
        return segments
    joined = Stream(protocol.name, *(np.concatenate([getattr(s, f) for s in segments])
                                     for f in ("clip", "corruption", "severity")),
                    corruption_names)
    if protocol.name == "mixed":
        shuffle = np.random.default_rng([seed, 1]).permutation(len(joined))
        joined = dataclasses.replace(joined, clip=joined.clip[shuffle],
                                     corruption=joined.corruption[shuffle],
                                     severity=joined.severity[shuffle])
    return [joined]


def correlated_order(clips: np.ndarray, labels: np.ndarray, delta: float, seed: int,
                     attempts: int = 1000) -> np.ndarray:
    """`clips` reordered so that classes come in runs (NOTE's Dirichlet sampling).

    The stream is cut into one chunk per class; each class's clips are shared out over
    the chunks in proportions drawn from Dirichlet(delta), giving nothing more to chunks
    already holding their share; draws are repeated until every chunk holds a few clips.
    Within a chunk the classes come in a random order, each as one run."""
    rng = np.random.default_rng([seed, 2])
    classes = np.unique(labels)
    num_chunks = len(classes)
    fair_share = len(clips) / num_chunks
    min_chunk = max(1, min(10, len(clips) // (2 * num_chunks)))
    for _ in range(attempts):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_chunks)]
        sizes = np.zeros(num_chunks)
        for k in classes:
            members = rng.permutation(clips[labels == k])
            share = rng.dirichlet(np.full(num_chunks, delta)) * (sizes < fair_share)
            share = share / share.sum() if share.sum() > 0 else np.full(num_chunks, 1 / num_chunks)
            cuts = (np.cumsum(share) * len(members)).astype(int)[:-1]
            for chunk, part in zip(chunks, np.split(members, cuts)):
                chunk.append(part)
            sizes += [len(part) for part in np.split(members, cuts)]
        if sizes.min() >= min_chunk:
            return np.concatenate([np.concatenate([chunk[i] for i in rng.permutation(len(chunk))])
                                   for chunk in chunks]).astype(clips.dtype)
    raise ConfigValueError(
        f"no class-correlated order with Dirichlet concentration {delta} leaves every chunk of "
        f"the {len(clips)}-clip stream {min_chunk} clips in {attempts} draws; use a larger "
        "concentration ('correlated:0.5') or a longer stream")


class StreamReader:
    """Global batches of a stream: uint8 clips corrupted (on the device, or on the host
    for the codec corruptions and rain), and their rows."""

    def __init__(self, split: pipeline.Split, batch_size: int, mesh, seed: int,
                 workers: int = 0):
        self.split, self.batch_size, self._mesh, self._seed = split, batch_size, mesh, seed
        self._workers = workers
        self._rows = parallel.host_slice(batch_size)

    def batches(self, stream: Stream, first: int = 0
                ) -> Iterator[tuple[jax.Array, dict[str, np.ndarray]]]:
        """`(corrupted clips on the mesh, {label, id, corruption, severity})` per batch,
        from batch `first` on (a stream resumed mid-way)."""
        starts = range(first * self.batch_size, len(stream), self.batch_size)
        loaded = loader.index_batches(
            self.split, [stream.clip[s:s + self.batch_size][self._rows] for s in starts],
            self._workers)
        for start, host in zip(starts, loaded):
            rows = slice(start, start + self.batch_size)
            info = parallel.gather_host_rows({k: host[k] for k in ("label", "id")})
            info.update(corruption=stream.corruption[rows], severity=stream.severity[rows])
            names = [stream.corruption_names[c] for c in info["corruption"][self._rows]]
            video = host_corruptions.corrupt_rows(host["video"], host["id"], names,
                                                  info["severity"][self._rows].tolist(),
                                                  self._seed)
            clips = parallel.to_global(video, self._mesh)
            yield self._corrupt(clips, info, stream.corruption_names), info

    def _corrupt(self, clips: jax.Array, info: dict[str, np.ndarray],
                 names: tuple[str, ...]) -> jax.Array:
        """Each row under its own corruption: every corruption present in the batch is
        applied to the whole (fixed-shape) batch and its rows are selected."""
        out = clips
        ids = parallel.to_global(info["id"][self._rows], self._mesh)
        for c, severity in sorted(set(zip(info["corruption"].tolist(),
                                          info["severity"].tolist()))):
            if corruptions.on_host(names[c]):
                continue  # done by `batches` before the clips went to the devices
            rows = (info["corruption"] == c) & (info["severity"] == severity)
            mask = parallel.to_global(rows[self._rows], self._mesh)
            out = _apply(out, clips, ids, mask, names[c], severity, self._seed)
        return out


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _apply(out: jax.Array, clips: jax.Array, ids: jax.Array, mask: jax.Array, name: str,
           severity: int, seed: int) -> jax.Array:
    corrupted = corruptions.corrupt_clips(clips, ids, name, severity, seed)
    return jnp.where(mask[:, None, None, None, None], corrupted, out)
