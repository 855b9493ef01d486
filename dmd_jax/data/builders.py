"""tensorflow-datasets builders: the embedded synthetic dataset and real video datasets.

Both write `array_record` files, which tfds prepares and reads (`tfds.data_source`,
random access) without TensorFlow. Every example has `label` and `id` (its index in the
split) and either `video` (uint8 `(T, H, W, 3)`: the synthetic dataset, a folder stored
`raw`) or `encoded` (the video file's bytes, with `num_frames`, `fps`, `height`,
`width` and `path`: a folder stored `encoded`). `dmd_jax.data.pipeline.Split` turns
either into the views a model sees, so the rest of dmd_jax never cares which.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import hashlib
import json
import multiprocessing
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from dmd_jax.data import sources, synthetic, video_codec
from dmd_jax.errors import ConfigValueError


def _video_features(frames: int, height: int, width: int,
                    names: tuple[str, ...]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        # Raw bytes: tfds's default stores a uint8 tensor as a list of int64s, whose
        # encoding and decoding took ~1.7 ms per 8x32x32 clip, most of preparing the demo.
        "video": tfds.features.Tensor(shape=(frames, height, width, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=list(names)),
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
    })


@dataclasses.dataclass
class SyntheticActionsConfig(tfds.core.BuilderConfig):
    """Clip geometry, split sizes, ceiling cameras and seed: everything that changes
    the bytes."""

    render: synthetic.RenderConfig = dataclasses.field(default_factory=synthetic.RenderConfig)
    split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    ceiling_cameras: dict[str, float] = dataclasses.field(default_factory=dict)  # split -> fraction
    seed: int = 0

    @classmethod
    def create(cls, render: synthetic.RenderConfig, split_sizes: dict[str, int], seed: int,
               ceiling_cameras: dict[str, float] | None = None) -> "SyntheticActionsConfig":
        """Names the config by a hash of its content, so two settings never share files."""
        ceiling_cameras = {k: float(v) for k, v in (ceiling_cameras or {}).items() if v}
        nameless = sorted(set(split_sizes) - set(synthetic.SPLIT_CODES))
        if nameless:
            raise ConfigValueError(f"the embedded dataset renders the splits "
                                   f"{sorted(synthetic.SPLIT_CODES)}, not {nameless}: each has "
                                   "its own random stream; rename them in data.split_sizes")
        unknown = set(ceiling_cameras) - set(split_sizes)
        if unknown:
            raise ConfigValueError(f"ceiling-camera fractions for splits the dataset does not have: "
                             f"{sorted(unknown)}; its splits are {sorted(split_sizes)}")
        content = json.dumps([synthetic.RENDERER_VERSION, dataclasses.asdict(render),
                              split_sizes, seed, ceiling_cameras], sort_keys=True)
        digest = hashlib.sha256(content.encode()).hexdigest()[:10]
        name = f"f{render.frames}_{render.height}x{render.width}_s{seed}_{digest}"
        return cls(name=name, render=render, split_sizes=dict(split_sizes),
                   ceiling_cameras=ceiling_cameras, seed=seed)


class SyntheticActions(tfds.core.GeneratorBasedBuilder):
    """Procedural action videos (see `dmd_jax.data.synthetic`); generated, never downloaded."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Videos stored as raw bytes."}
    BUILDER_CONFIGS = [SyntheticActionsConfig.create(
        synthetic.RenderConfig(), {"train": 4096, "calibration": 1024, "test": 1024,
                                   "unlabelled": 2048}, 0)]

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.render
        return self.dataset_info_from_configs(
            features=_video_features(r.frames, r.height, r.width, synthetic.CLASSES),
            supervised_keys=("video", "label"),
            description=synthetic.__doc__,
            disable_shuffling=True,  # rows stay in id order; the pipeline shuffles per step
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes.items()}

    def _generate_examples(self, split: str, num_clips: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        fraction = cfg.ceiling_cameras.get(split, 0.0)
        chunks = [(cfg.seed, split, start, min(start + 256, num_clips), cfg.render, fraction)
                  for start in range(0, num_clips, 256)]
        # Rendering is numpy-bound: spread chunks over the cores, keep the order. Spawned,
        # not forked: the parent may already run JAX's threads, and fork would copy locks.
        workers = min(len(chunks), os.cpu_count() or 1)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for examples in pool.map(_render_chunk, chunks):
                yield from examples


def _render_chunk(args) -> list[tuple[int, dict]]:
    seed, split, start, stop, render, ceiling_fraction = args
    out = []
    for i in range(start, stop):
        clip, label, _, _ = synthetic.render_example(seed, split, i, render, ceiling_fraction)
        out.append((i, {"video": clip, "label": label, "id": i}))
    return out


def flippable_classes(builder: tfds.core.DatasetBuilder) -> np.ndarray:
    """Per class, whether a horizontally flipped clip keeps its label: not for the
    synthetic dataset's left/right twins (`synthetic.MIRROR_INVARIANT`), nor for a source
    that is not `flip_safe` (Something-Something: "left to right" is the label)."""
    names = builder.info.features["label"].names
    if isinstance(builder, SyntheticActions):
        return np.asarray([n in synthetic.MIRROR_INVARIANT for n in names])
    return np.full(len(names), bool(getattr(builder, "flip_safe", True)))


def _encoded_features(names: tuple[str, ...]) -> tfds.features.FeaturesDict:
    """A video kept as its encoded file's bytes, with what sampling a view needs to know
    without decoding it: its frame count, average rate and size."""
    return tfds.features.FeaturesDict({
        "encoded": tfds.features.Tensor(shape=(), dtype=np.object_),
        "path": tfds.features.Tensor(shape=(), dtype=np.object_),  # relative, for messages
        "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
        "fps": tfds.features.Tensor(shape=(), dtype=np.float32),
        "height": tfds.features.Tensor(shape=(), dtype=np.int32),
        "width": tfds.features.Tensor(shape=(), dtype=np.int32),
        "label": tfds.features.ClassLabel(names=list(names)),
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
    })


STORAGE = ("encoded", "raw")


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
    """A video dataset read by a source (`dmd_jax.data.sources.<source>`) from `root`.

    `storage='encoded'` (the default) keeps every video's bytes, re-encoded once to H.264
    at `short_side` when that is set (else as published), and decodes views on the fly;
    `'raw'` stores one uniform `frames x size x size` uint8 view per video (the format
    before encoded storage: ~2.4 MB a clip at 16x224x224)."""

    source: str = "video_folder"
    settings: dict = dataclasses.field(default_factory=dict)  # the source's fields (root, ...)
    storage: str = "encoded"
    short_side: int = 0  # encoded: re-encode videos whose short side is larger (0: never)
    frames: int = 8  # raw only
    size: int = 112  # raw only


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """Real videos: any folder of class subfolders, or a published dataset's layout and
    split files (UCF101, HMDB51, Kinetics-400, Something-Something v2), by its source.

    Videos are stored in a stratified order (`stratified_order`) and decoded once with
    PyAV when stored, to prove they decode; those that do not, and those the split files
    list but the disk lacks, are left out with a warning naming them (`skipped`)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Videos stored as raw bytes.",
                     "2.0.0": "Videos stored encoded (storage='encoded'), decoded on the fly; "
                              "published layouts; stratified order."}

    @classmethod
    def for_source(cls, source: str, settings: dict, frames: int, size: int,
                   storage: str = "encoded", short_side: int = 0, **kwargs) -> "VideoFolder":
        """Named by the source, its files (`VideoSource.digest`) and what is stored: a
        changed dataset is prepared anew."""
        if storage not in STORAGE:
            raise ConfigValueError(f"config.data.storage={storage!r}: expected one of {STORAGE}")
        settings = {**settings, "root": os.path.abspath(settings["root"])}
        reader = sources.make(source, settings)  # before any work: layout errors
        shape = (f"f{frames}_{size}" if storage == "raw"
                 else f"enc{short_side}" if short_side else "enc")
        digest = hashlib.sha256(f"{shape}|{reader.digest()}".encode()).hexdigest()[:10]
        base = os.path.basename(settings["root"].rstrip("/")) or "root"
        config = VideoFolderConfig(name=f"{source}_{base}_{shape}_{digest}", source=source,
                                   settings=settings, storage=storage, short_side=short_side,
                                   frames=frames, size=size)
        return cls(config=config, **kwargs)

    @property
    def reader(self) -> sources.VideoSource:
        c = self.builder_config
        return sources.source_class(c.source)(**c.settings)

    @property
    def flip_safe(self) -> bool:
        return self.reader.flip_safe

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        names = self.reader.classes()
        features = (_video_features(c.frames, c.size, c.size, names) if c.storage == "raw"
                    else _encoded_features(names))
        return self.dataset_info_from_configs(features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.reader.splits()}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        """Decodable videos only, in a stable stratified order (`stratified_order`);
        decoded (proven) on several cores."""
        c = self.builder_config
        reader = self.reader
        jobs = [(path, os.path.relpath(path, reader.root), label, c.storage, c.short_side,
                 c.frames, c.size) for path, label in stratified_order(reader.videos(split))]
        workers = min(max(len(jobs) // 8, 1), os.cpu_count() or 1)
        context = multiprocessing.get_context("spawn")
        i = 0
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for (path, *_), result in zip(jobs, pool.map(_store_video, jobs, chunksize=4)):
                if isinstance(result, str):  # why it cannot be stored
                    logging.warning("skipping a video: %s", result)
                    self.skipped.append(path)
                    continue
                yield i, {**result, "id": i}
                i += 1

    @property
    def skipped(self) -> list[str]:
        if not hasattr(self, "_skipped"):
            self._skipped = []
        return self._skipped


def stratified_order(videos: list[tuple[str, int]], seed: int = 0) -> list[tuple[str, int]]:
    """`(path, label)` pairs shuffled so that every contiguous slice holds each class in
    proportion: a folder lists its videos class by class, and a split spec such as
    'train[:50%]' of that order would hold only half of the classes. Each class's videos
    in a random order are spread evenly over the split (fixed seed: the same folder gives
    the same order)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray([label for _, label in videos])
    keys = np.empty(len(videos))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ranks = rng.permutation(len(members))
        keys[members] = (ranks + rng.uniform(size=len(members))) / len(members)
    return [videos[i] for i in np.argsort(keys, kind="stable")]


def _store_video(job) -> dict | str:
    """One video's example (without its id), or why it cannot be stored."""
    path, relative, label, storage, short_side, frames, size = job
    if not os.path.isfile(path):
        return f"video {relative!r} is listed in the split files but not on disk"
    try:
        with open(path, "rb") as f:
            data = f.read()
        if storage == "raw":
            return {"video": video_codec.uniform_view(data, frames, size, relative),
                    "label": label}
        if short_side:
            data = video_codec.reencode(data, short_side, relative)
        info = video_codec.probe(data, relative)
    except video_codec.VideoDecodeError as err:
        return str(err)
    return {"encoded": data, "path": relative.encode(), "num_frames": info.num_frames,
            "fps": info.fps, "height": info.height, "width": info.width, "label": label}
