"""The input pipeline: which tfds builder a config names, and batches from its splits.

Training batches are a pure function of `(seed, step)`: the global batch at step `s`
is rows `s*B .. (s+1)*B` of an endless stream of per-epoch permutations of the split,
and each host loads only its own rows of it. So the pipeline's position *is* the step
saved in the checkpoint: a resumed run sees exactly the batches it would have seen,
with no iterator state to save, and 1 host or 64 hosts see the same global batches.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from dmd_jax import config_utils, files, parallel, reporting
from dmd_jax.data import builders, sources, synthetic, video_codec
from dmd_jax.data import views as views_lib
from dmd_jax.errors import ConfigValueError, UserError, check_positive

# Kinetics statistics, as pytorchvideo's X3D and VideoMAE checkpoints expect.
MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """The dataset is not on disk and the config does not allow preparing it."""


class DatasetWriteError(UserError, OSError):
    """The dataset cannot be prepared where the config says."""


class DatasetCorruptError(UserError, ValueError):
    """A prepared dataset's files cannot be read."""


# config.data: the keys every dataset takes, and each dataset's own.
DATA_KEYS = ("name", "data_dir", "cache_dir", "prepare", "seed", "frames", "size", "split_specs",
             "views", "workers")
SYNTHETIC = "synthetic_actions"
SYNTHETIC_KEYS = ("split_sizes", "ceiling_cameras")
# Every real video dataset's own keys, beside its source's fields (root, fold, ...):
# storage 'encoded': the videos' bytes, decoded on the fly ('raw': one uint8 view);
# short_side > 0: re-encode (once, H.264) videos whose short side is larger.
STORAGE_DEFAULTS = dict(storage="encoded", short_side=0)


def dataset_keys(name: str) -> tuple[str, ...]:
    """The keys of `config.data` that dataset `name` reads, beside `DATA_KEYS`."""
    if name == SYNTHETIC:
        return SYNTHETIC_KEYS
    return (*sources.keys(name), *STORAGE_DEFAULTS)


def dataset_defaults(name: str) -> dict[str, Any]:
    """A real video dataset's own keys with their defaults (configs start from these)."""
    return {**sources.defaults(name), **STORAGE_DEFAULTS}


def make_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder that `config.data` names (array_record files, no TensorFlow),
    on local disk: a bucket's data_dir is mirrored locally (`local_data_dir`)."""
    config_utils.check_keys(data, DATA_KEYS + dataset_keys(data.name), "config.data",
                            f"dataset {data.name!r}")
    check_positive(data, ("frames", "size"), "config.data")
    common = dict(data_dir=local_data_dir(data), file_format="array_record")
    if data.name == SYNTHETIC:
        render = synthetic.RenderConfig(frames=data.frames, height=data.size, width=data.size)
        sizes = {split: int(n) for split, n in data.split_sizes.items()}
        ceiling = dict(data.get("ceiling_cameras") or {})
        config = builders.SyntheticActionsConfig.create(render, sizes, data.seed, ceiling)
        return builders.SyntheticActions(config=config, **common)
    if not data.root:
        raise UserError(f"config.data.name={data.name!r} needs the dataset's folder: "
                        "--config.data.root=DIR (the layout it reads: "
                        f"{sources.source_class(data.name).__module__}'s docstring)")
    settings = {k: data[k] for k in sources.keys(data.name)}
    return builders.VideoFolder.for_source(data.name, settings, data.frames, data.size,
                                           data.storage, int(data.short_side), **common)


def local_data_dir(data: ml_collections.ConfigDict) -> str | None:
    """Where the dataset's files are read: `data.data_dir` (None: tfds's default), or for a
    bucket (`gs://...`) a local mirror of it under `data.cache_dir` (default
    ~/.cache/dmd_jax/datasets): array_record files are read through local files only."""
    if not data.data_dir or files.is_local(data.data_dir):
        return data.data_dir or None
    root = data.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "dmd_jax",
                                                 "datasets")
    name = hashlib.sha256(str(data.data_dir).encode()).hexdigest()[:10]
    return os.path.join(root, name)


def _remote_copy(builder: tfds.core.DatasetBuilder,
                 data: ml_collections.ConfigDict):
    """The bucket folder that mirrors the builder's local dataset folder (None if local)."""
    if not data.data_dir or files.is_local(data.data_dir):
        return None
    relative = os.path.relpath(os.fspath(builder.data_path), local_data_dir(data))
    return files.path(data.data_dir) / relative


def prepare(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Returns a prepared builder; generates it first when `data.prepare` allows.

    The main host decides and writes; every host raises the same error or waits for the
    files, so no host is left hanging at a barrier. With a bucket as data_dir, every host
    reads a local mirror: copied from the bucket when the bucket has the dataset, else
    prepared by the main host and uploaded for the others (and for later runs)."""
    builder = make_builder(data)
    remote = _remote_copy(builder, data)
    if remote is not None and not builder.is_prepared() and _download(remote, builder):
        builder = make_builder(data)  # reads the downloaded dataset's info
    missing = bool(parallel.broadcast_from_main(np.asarray(not builder.is_prepared())))
    if missing and not data.prepare:
        raise DatasetNotPreparedError(
            f"dataset {builder.name}/{builder.builder_config.name} is not prepared in "
            f"{builder.data_dir_root}. Prepare it with --config.data.prepare=True (or "
            "point --config.data.data_dir at the folder that holds it).")
    if missing and parallel.is_main_process():
        print(f"Preparing dataset {builder.name}/{builder.builder_config.name} in "
              f"{builder.data_dir_root} (once) ...", flush=True)
        try:
            builder.download_and_prepare()
        except OSError as err:
            raise DatasetWriteError(
                f"cannot prepare dataset {builder.name} in {builder.data_dir_root} "
                f"({err.strerror or err}); pass a writable --config.data.data_dir") from err
        skipped = getattr(builder, "skipped", [])
        if skipped:  # undecodable videos, each named in a warning as it was skipped
            print(f"Skipped {len(skipped)} undecodable video(s); listed in "
                  f"{files.path(builder.data_path) / SKIPPED_FILE}", flush=True)
        files.write_json(files.path(builder.data_path) / SKIPPED_FILE, {"skipped": skipped})
        _log_storage(storage_report(builder, data))
        if remote is not None:
            _upload(builder, remote)
    parallel.barrier("dataset prepared")
    if parallel.is_main_process():
        return builder
    builder = make_builder(data)
    if remote is not None and not builder.is_prepared() and _download(remote, builder):
        builder = make_builder(data)
    return builder


_COMPLETE = "dataset_info.json"
SKIPPED_FILE = "skipped_videos.json"


def skipped_videos(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The video files left out of the prepared dataset because they could not be decoded."""
    path = files.path(builder.data_path) / SKIPPED_FILE
    return files.read_json(path)["skipped"] if path.exists() else []  # tfds counts a dataset folder as prepared once it has this


def _upload(builder: tfds.core.DatasetBuilder, remote) -> None:
    """The local dataset folder to the bucket, its completion marker last."""
    local = files.path(builder.data_path)
    for path in sorted(files.walk_files(local), key=lambda p: p.name == _COMPLETE):
        files.write_bytes(remote / path.relative_to(local), path.read_bytes())


def _download(remote, builder: tfds.core.DatasetBuilder) -> bool:
    """The bucket's copy of the dataset into the local mirror, if the bucket has one
    (False if not): into a temporary folder renamed when complete, so a killed copy is
    never read."""
    if not (remote / _COMPLETE).exists():
        return False
    local = files.path(builder.data_path)
    staging = local.parent / f".{local.name}.download.{os.getpid()}"
    for path in files.walk_files(remote):
        target = staging / path.relative_to(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    if local.exists():  # another process finished first
        staging.rmtree()
    else:
        staging.rename(local)
    return True


def storage_report(builder: tfds.core.DatasetBuilder,
                   data: ml_collections.ConfigDict) -> dict[str, Any]:
    """Bytes on disk per clip for every split of a prepared dataset, next to what one
    raw uint8 view at the config's clip shape takes (the format before encoded storage)."""
    folder = files.path(builder.data_path)
    splits = {}
    for name, info in builder.info.splits.items():
        stored = sum(p.stat().length for p in folder.glob(f"*-{name}.array_record*"))
        clips = int(info.num_examples)
        splits[name] = {"clips": clips, "bytes": int(stored),
                        "bytes_per_clip": stored / clips if clips else None}
    return {"dataset": f"{builder.name}/{builder.builder_config.name}",
            "storage": "encoded" if "encoded" in builder.info.features else "raw",
            "raw_bytes_per_clip": int(data.frames) * int(data.size) ** 2 * 3,
            "splits": splits}


def _log_storage(report: dict[str, Any]) -> None:
    for name, split in report["splits"].items():
        if split["clips"]:
            print(f"  {name}: {split['clips']} clips, {split['bytes_per_clip'] / 1e3:.1f} kB per "
                  f"clip stored {report['storage']} (one raw uint8 view at this clip shape: "
                  f"{report['raw_bytes_per_clip'] / 1e3:.1f} kB)", flush=True)


def dataset_identity(builder: tfds.core.DatasetBuilder,
                     data: ml_collections.ConfigDict) -> dict[str, Any]:
    """What results made from this data depend on, for artifact stamps: the prepared
    dataset (its builder config's name hashes what generated it; a video folder's, its
    files), the split specs and the clip shape."""
    return {"dataset": f"{builder.name}/{builder.builder_config.name}@{builder.version}",
            "split_specs": dict(data.get("split_specs") or {}),
            **views_lib.ViewConfig.from_config(data).identity()}


class Split:
    """One split of a prepared dataset: random access to `(video, label, id)` rows.

    `split` is a tfds split name, optionally sliced (`"train[:80%]"`, `"train[80%:]"`),
    so datasets published with only train/test (UCF101, HMDB51) still give the
    unlabelled pool and the calibration set; `+` joins splits (`"train+broad"`). A row's
    `id` is its position in this split (slice): stable across runs, hosts and batchings,
    which is what resumable labelling and the per-clip corruption keys rely on.

    `rows` gives the evaluation views of `views` (one clip `(T, S, S, 3)` each, or
    `(V, T, S, S, 3)` with several), `train_rows` one random training view per row;
    raw and encoded datasets alike (`dmd_jax.data.views`)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, frames: int, size: int,
                 name: str | None = None, views: views_lib.ViewConfig | None = None):
        for part in split.split("+"):
            base = part.split("[", 1)[0]
            if base not in builder.info.splits:
                raise ConfigValueError(f"dataset {builder.name} has no split {base!r}; it has "
                                 f"{sorted(builder.info.splits)} (slices like 'train[:80%]' "
                                 "and joins like 'train+test' work)")
        self.name = name or split  # the jobs' name for it (output folders, logs)
        if builder.info.splits[split].num_examples == 0:
            raise UserError(f"split {self.name!r} ({split!r} of {builder.name}) holds no clips: "
                            "widen its slice in config.data.split_specs")
        self._folder = builder.data_path
        try:
            self._source = builder.as_data_source(split=split)
        except (RuntimeError, OSError) as err:
            raise DatasetCorruptError(
                f"the prepared dataset in {builder.data_path} cannot be opened ({err}): delete "
                "that folder and run again to prepare it anew") from err
        self.views = views or views_lib.ViewConfig(frames, size)
        self._builder, self._split_spec = builder, split
        self.encoded = "encoded" in builder.info.features
        self.num_classes = builder.info.features["label"].num_classes
        self.class_names = tuple(builder.info.features["label"].names)
        self.flippable = builders.flippable_classes(builder)
        if self.views.flip and not self.flippable.any():
            reporting.log(f"[data] {builder.name}: no class may be flipped (left/right "
                          "matters to every class); config.data.views.flip has no effect")

    def __len__(self) -> int:
        return len(self._source)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for the loader's worker processes without the open reader: each
        process opens its own (`__setstate__`)."""
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._source = self._builder.as_data_source(split=self._split_spec)

    def labels(self) -> np.ndarray:
        """Every row's label, read without decoding a frame (a class-ordered stream needs
        them before any clip is read)."""
        heavy = "encoded" if self.encoded else "video"
        source = self._builder.as_data_source(
            split=self._split_spec, decoders={heavy: tfds.decode.SkipDecoding()})
        rows = range(len(source))
        return np.asarray([e["label"] for start in rows[::1024]
                           for e in source.__getitems__(list(rows[start:start + 1024]))],
                          np.int32)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The rows' evaluation views (`video` `(B, T, S, S, 3)`, or `(B, V, ...)` for
        V > 1 views)."""
        examples = self._read(indices)
        clips = [self._render(e, views_lib.eval_views(self.views, self._num_frames(e)))
                 for e in examples]
        video = np.stack(clips)
        return self._batch(video[:, 0] if self.views.num_eval_views == 1 else video,
                           examples, indices)

    def train_rows(self, indices: np.ndarray, seed: int, step: int,
                   positions: np.ndarray) -> dict[str, np.ndarray]:
        """One training view per row, drawn from `(seed, step, position in the global
        batch)`: the same on every host and after a resume."""
        examples = self._read(indices)
        clips = []
        for example, position in zip(examples, positions):
            rng = views_lib.rng_for(seed, step, int(position))
            view = views_lib.train_view(self.views, self._num_frames(example), rng,
                                        bool(self.flippable[example["label"]]))
            clips.append(self._render(example, [view])[0])
        return self._batch(np.stack(clips), examples, indices)

    def _read(self, indices: np.ndarray) -> list[dict[str, Any]]:
        try:
            return self._source.__getitems__([int(i) for i in indices])
        except (RuntimeError, OSError, ValueError) as err:  # array_record's reader errors
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise DatasetCorruptError(
                f"split {self.name!r} of the prepared dataset in {self._folder} cannot be read "
                f"({first}): its files are truncated or damaged. Delete that folder and run "
                "again to prepare the dataset anew.") from err

    @staticmethod
    def _batch(video: np.ndarray, examples: list[dict[str, Any]],
               indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"video": video, "label": np.asarray([e["label"] for e in examples], np.int32),
                "id": np.asarray(indices, np.int32)}

    def _num_frames(self, example: dict[str, Any]) -> int:
        return int(example["num_frames"]) if self.encoded else len(example["video"])

    def _render(self, example: dict[str, Any], views: list[views_lib.View]) -> np.ndarray:
        """`(len(views), T, S, S, 3)`: decoded once per short side, then cropped."""
        out: list[np.ndarray | None] = [None] * len(views)
        for short in sorted({v.short_side for v in views}):
            group = [k for k, v in enumerate(views) if v.short_side == short]
            wanted = np.unique(np.concatenate([views[k].indices for k in group]))
            frames = self._frames(example, wanted, short)
            for k in group:
                chosen = frames[np.searchsorted(wanted, views[k].indices)]
                out[k] = views_lib.crop(chosen, views[k], self.views.size)
        return np.stack(out)

    def _frames(self, example: dict[str, Any], indices: np.ndarray, short_side: int) -> np.ndarray:
        if not self.encoded:
            return views_lib.resize_short_side(example["video"][indices], short_side)
        name = example["path"].decode() if isinstance(example["path"], bytes) else example["path"]
        try:
            return video_codec.decode(example["encoded"], indices, short_side, name)
        except video_codec.VideoDecodeError as err:
            raise DatasetCorruptError(
                f"split {self.name!r}: {err}. It decoded when the dataset was prepared in "
                f"{self._folder}, so the stored bytes are damaged: delete that folder and run "
                "again to prepare the dataset anew.") from err


def open_split(builder: tfds.core.DatasetBuilder, data: ml_collections.ConfigDict,
                name: str) -> Split:
    """The split the jobs call `name` ('train', 'unlabelled', 'calibration', 'test'):
    `data.split_specs[name]` when set (e.g. 'train[50%:90%]' for UCF101's unlabelled
    pool), else the dataset's split of that name; at the config's clip shape and views."""
    spec = (data.get("split_specs") or {}).get(name, name)
    return Split(builder, spec, data.frames, data.size, name=name,
                 views=views_lib.ViewConfig.from_config(data))


def train_indices(num_examples: int, global_batch: int, step: int, seed: int,
                  rows: slice) -> np.ndarray:
    """Dataset indices of `rows` of the global batch at `step` (endless, reshuffled per epoch)."""
    positions = np.arange(step * global_batch, (step + 1) * global_batch)[rows]
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def resample(video: jnp.ndarray, frames: int, size: int) -> jnp.ndarray:
    """uint8 clips `(B, T, H, W, 3)` -> `(B, frames, size, size, 3)` on the device.

    Models with different input shapes read one prepared dataset (e.g. an X3D-S edge at
    13x160 and a VideoMAE cloud at 16x224): uniform temporal sampling (as
    `views.eval_views` with sampling_rate 0), then an antialiased bilinear resize. A no-op at the right shape."""
    _, length, height, width, channels = video.shape
    if (length, height, width) == (frames, size, size):
        return video
    if length != frames:
        video = video[:, np.linspace(0, length - 1, frames).round().astype(int)]
    if (height, width) != (size, size):
        resized = jax.image.resize(video.astype(jnp.float32),
                                   (video.shape[0], frames, size, size, channels), "bilinear")
        video = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    return video


def normalize(video: jnp.ndarray, mean: tuple[float, ...] = MEAN,
              std: tuple[float, ...] = STD) -> jnp.ndarray:
    """uint8 clips -> normalised float32 model input (done on the device, inside jit).

    Each model family was trained with its own statistics (`models.input_stats`)."""
    x = video.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean)) / jnp.asarray(std)
