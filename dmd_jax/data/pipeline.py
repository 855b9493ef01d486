"""The input pipeline: which tfds builder a config names, and batches from its splits.

Training batches are a pure function of `(seed, step)`: the global batch at step `s`
is rows `s*B .. (s+1)*B` of an endless stream of per-epoch permutations of the split,
and each host loads only its own rows of it. So the pipeline's position *is* the step
saved in the checkpoint: a resumed run sees exactly the batches it would have seen,
with no iterator state to save, and 1 host or 64 hosts see the same global batches.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dmd_jax import config_utils, files, parallel
from dmd_jax.data import builders, synthetic
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


class TensorFlowNeededError(UserError, ModuleNotFoundError):
    """A tfds builder that decodes with TensorFlow, which is not installed."""


# config.data: the keys every dataset takes, and each dataset's own.
DATA_KEYS = ("name", "data_dir", "cache_dir", "prepare", "seed", "frames", "size", "split_specs")
DATASET_KEYS = {"synthetic_actions": ("split_sizes", "ceiling_cameras"),
                "video_folder": ("root",), "ucf101": ("tfds_config",)}


def make_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder that `config.data` names (array_record files, no TensorFlow),
    on local disk: a bucket's data_dir is mirrored locally (`local_data_dir`)."""
    if data.name in DATASET_KEYS:
        config_utils.check_keys(data, DATA_KEYS + DATASET_KEYS[data.name], "config.data",
                                f"dataset {data.name!r}")
    check_positive(data, ("frames", "size"), "config.data")
    common = dict(data_dir=local_data_dir(data), file_format="array_record")
    if data.name == "synthetic_actions":
        render = synthetic.RenderConfig(frames=data.frames, height=data.size, width=data.size)
        sizes = {split: int(n) for split, n in data.split_sizes.items()}
        ceiling = dict(data.get("ceiling_cameras") or {})
        config = builders.SyntheticActionsConfig.create(render, sizes, data.seed, ceiling)
        return builders.SyntheticActions(config=config, **common)
    if data.name == "video_folder":
        if not data.root:
            raise UserError("config.data.name='video_folder' needs the folder of videos: "
                            "--config.data.root=DIR (laid out DIR/<split>/<class>/<video>)")
        return builders.VideoFolder.for_folder(data.root, data.frames, data.size, **common)
    if data.name == "ucf101":
        if importlib.util.find_spec("tensorflow") is None:
            raise TensorFlowNeededError(
                "tfds's ucf101 builder decodes its videos with TensorFlow, which is not "
                "installed: `pip install tensorflow`, or lay UCF101 out as a folder of videos "
                "and use configs/video_folder.py")
        return tfds.builder(f"ucf101/{data.tfds_config}", **common)
    raise ConfigValueError(f"unknown config.data.name {data.name!r}; expected one of "
                     "'synthetic_actions', 'video_folder', 'ucf101'")


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


def dataset_identity(builder: tfds.core.DatasetBuilder,
                     data: ml_collections.ConfigDict) -> dict[str, Any]:
    """What results made from this data depend on, for artifact stamps: the prepared
    dataset (its builder config's name hashes what generated it; a video folder's, its
    files), the split specs and the clip shape."""
    return {"dataset": f"{builder.name}/{builder.builder_config.name}@{builder.version}",
            "split_specs": dict(data.get("split_specs") or {}),
            "frames": int(data.frames), "size": int(data.size)}


class Split:
    """One split of a prepared dataset: random access to `(video, label, id)` rows.

    `split` is a tfds split name, optionally sliced (`"train[:80%]"`, `"train[80%:]"`),
    so datasets published with only train/test (UCF101, HMDB51) still give the
    unlabelled pool and the calibration set; `+` joins splits (`"train+broad"`). A row's
    `id` is its position in this split (slice): stable across runs, hosts and batchings,
    which is what resumable labelling and the per-clip corruption keys rely on."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, frames: int, size: int,
                 name: str | None = None):
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
        self._frames, self._size = frames, size
        self._builder, self._split_spec = builder, split
        self.num_classes = builder.info.features["label"].num_classes
        self.class_names = tuple(builder.info.features["label"].names)

    def __len__(self) -> int:
        return len(self._source)

    def labels(self) -> np.ndarray:
        """Every row's label, read without decoding a frame (a class-ordered stream needs
        them before any clip is read)."""
        source = self._builder.as_data_source(
            split=self._split_spec, decoders={"video": tfds.decode.SkipDecoding()})
        rows = range(len(source))
        return np.asarray([e["label"] for start in rows[::1024]
                           for e in source.__getitems__(list(rows[start:start + 1024]))],
                          np.int32)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        try:
            examples = self._source.__getitems__([int(i) for i in indices])
        except (RuntimeError, OSError, ValueError) as err:  # array_record's reader errors
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise DatasetCorruptError(
                f"split {self.name!r} of the prepared dataset in {self._folder} cannot be read "
                f"({first}): its files are truncated or damaged. Delete that folder and run "
                "again to prepare the dataset anew.") from err
        return {
            "video": np.stack([_fit_clip(e["video"], self._frames, self._size) for e in examples]),
            "label": np.asarray([e["label"] for e in examples], np.int32),
            "id": np.asarray(indices, np.int32),
        }


def open_split(builder: tfds.core.DatasetBuilder, data: ml_collections.ConfigDict,
                name: str) -> Split:
    """The split the jobs call `name` ('train', 'unlabelled', 'calibration', 'test'):
    `data.split_specs[name]` when set (e.g. 'train[50%:90%]' for UCF101's unlabelled
    pool), else the dataset's split of that name; at the config's clip shape."""
    spec = (data.get("split_specs") or {}).get(name, name)
    return Split(builder, spec, data.frames, data.size, name=name)


def _fit_clip(video: np.ndarray, frames: int, size: int) -> np.ndarray:
    """A stored clip at the config's shape: uniform temporal sampling (datasets stored at
    their own length, e.g. ucf101), then, if the frames are another size (ucf101_1_256
    stores 256x256), a centre square crop resized to `size` (the usual test-time view)."""
    if video.shape[0] != frames:
        video = video[np.linspace(0, video.shape[0] - 1, frames).round().astype(int)]
    height, width = video.shape[1:3]
    if (height, width) != (size, size):
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        crops = video[:, top:top + side, left:left + side]
        video = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
                          for f in crops])
    return video


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


def train_batches(split: Split, global_batch: int, start_step: int, seed: int,
                  rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of the global batches at steps `start_step, start_step+1, ...`."""
    step = start_step
    while True:
        yield split.rows(train_indices(len(split), global_batch, step, seed, rows))
        step += 1


def eval_batches(split: Split, global_batch: int, rows: slice, start: int = 0,
                 stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over clips `start..stop` in order; the last batch is padded, `mask`
    marks the real rows."""
    stop = len(split) if stop is None else min(stop, len(split))
    for first in range(start, stop, global_batch):
        positions = np.arange(first, first + global_batch)[rows]
        mask = positions < stop
        batch = split.rows(np.minimum(positions, stop - 1))
        batch["mask"] = mask
        yield batch


def prefetch(batches: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Loads the next `depth` batches on a background thread while the device computes."""
    iterator = iter(batches)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = [pool.submit(next, iterator, None) for _ in range(depth)]
        while True:
            batch = pending.pop(0).result()
            if batch is None:
                return
            pending.append(pool.submit(next, iterator, None))
            yield batch


def resample(video: jnp.ndarray, frames: int, size: int) -> jnp.ndarray:
    """uint8 clips `(B, T, H, W, 3)` -> `(B, frames, size, size, 3)` on the device.

    Models with different input shapes read one prepared dataset (e.g. an X3D-S edge at
    13x160 and a VideoMAE cloud at 16x224): uniform temporal sampling as in
    `_fit_clip`, then an antialiased bilinear resize. A no-op at the right shape."""
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
