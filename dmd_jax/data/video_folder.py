"""Real video files laid out as `root/<split>/<class>/<video>`, decoded with PyAV.

Frames are sampled uniformly over the whole video, resized so the short side is
`size` and centre-cropped to `size x size`: the usual test-time view of action
recognition, cheap enough to store as uint8 arrays in the tfds dataset.

`check_layout` refuses, before any work, a folder a dataset cannot be made of (no
splits, a class folder without videos, a split without any); a video that cannot be
decoded is skipped with a warning naming it (`VideoDecodeError` from `decode`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import av
import numpy as np

from dmd_jax.errors import ConfigValueError, UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class VideoFolderError(UserError, FileNotFoundError):
    """A video folder a dataset cannot be made of."""


class VideoDecodeError(UserError, ValueError):
    """One video file that PyAV cannot decode (skipped when a dataset is prepared)."""


def check_layout(root: str) -> None:
    """Every split has every class folder, and each holds at least one video file."""
    classes = class_names(root)
    if not classes:
        raise VideoFolderError(f"video folder {root!r} has no class folders in its splits")
    for split in split_names(root):
        for name in classes:
            if not any(f.lower().endswith(VIDEO_EXTENSIONS)
                       for f in os.listdir(os.path.join(root, split, name))):
                raise VideoFolderError(
                    f"class folder {os.path.join(root, split, name)!r} holds no video file "
                    f"({', '.join(VIDEO_EXTENSIONS)}): add its videos or remove the folder "
                    "from every split")


def split_names(root: str) -> list[str]:
    """Splits are the subfolders of `root` (e.g. train/, test/)."""
    if not os.path.isdir(root):
        raise VideoFolderError(
            f"video folder {root!r} does not exist; set config.data.root to a folder laid out "
            "as <root>/<split>/<class>/<video file>")
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not splits:
        raise VideoFolderError(f"video folder {root!r} has no split subfolders (train/, test/...)")
    return splits


def class_names(root: str) -> tuple[str, ...]:
    """Sorted class folders of the first split; every split must have the same ones."""
    splits = split_names(root)
    classes = tuple(sorted(
        d for d in os.listdir(os.path.join(root, splits[0]))
        if os.path.isdir(os.path.join(root, splits[0], d))))
    for split in splits[1:]:
        other = tuple(sorted(d for d in os.listdir(os.path.join(root, split))
                             if os.path.isdir(os.path.join(root, split, d))))
        if other != classes:
            raise ConfigValueError(f"split {split!r} of {root!r} has class folders {other[:5]}..., "
                             f"but {splits[0]!r} has {classes[:5]}...; they must match")
    return classes


def list_videos(root: str, split: str, classes: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(path, label) for every video of a split, in a stable order."""
    for label, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(VIDEO_EXTENSIONS):
                yield os.path.join(folder, file), label


def decode(path: str, frames: int, size: int) -> np.ndarray:
    """`(frames, size, size, 3)` uint8: uniformly sampled, short side resized, centre crop."""
    try:
        with av.open(path) as container:
            # Keep only small frames in memory: long videos have thousands of frames.
            small = [_resize_crop(f, size) for f in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"cannot decode video {path!r}: {err}. Remove or re-encode it.") from err
    if not small:
        raise VideoDecodeError(f"video {path!r} has no frames. Remove or re-encode it.")
    picks = np.linspace(0, len(small) - 1, frames).round().astype(int)
    return np.stack([small[i] for i in picks])


def _resize_crop(frame: av.VideoFrame, size: int) -> np.ndarray:
    scale = size / min(frame.width, frame.height)
    width = max(size, round(frame.width * scale))
    height = max(size, round(frame.height * scale))
    rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    top, left = (height - size) // 2, (width - size) // 2
    return rgb[top:top + size, left:left + size]


def listing_digest(root: str) -> str:
    """A hash of every split, class folder and video file (name and size): a folder that
    gained or lost a class or a video is another dataset, prepared anew, never read as
    the old one."""
    digest = hashlib.sha256()
    for split in split_names(root):
        for folder, dirs, names in sorted(os.walk(os.path.join(root, split))):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(folder, name)
                digest.update(f"{os.path.relpath(path, root)}|{os.path.getsize(path)}\n".encode())
            for name in dirs:  # empty class folders count too
                digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}/\n".encode())
    return digest.hexdigest()[:10]
