"""Real video files laid out as `root/<split>/<class>/<video>`, decoded with PyAV.

Frames are sampled uniformly over the whole video, resized so the short side is
`size` and centre-cropped to `size x size`: the usual test-time view of action
recognition, cheap enough to store as uint8 arrays in the tfds dataset.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import av
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


def split_names(root: str) -> list[str]:
    """Splits are the subfolders of `root` (e.g. train/, test/)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"video folder {root!r} does not exist; set config.data.root to a folder laid out "
            "as <root>/<split>/<class>/<video file>")
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not splits:
        raise FileNotFoundError(f"video folder {root!r} has no split subfolders (train/, test/...)")
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
            raise ValueError(f"split {split!r} of {root!r} has class folders {other[:5]}..., "
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
        raise ValueError(f"cannot decode video {path!r}: {err}. Remove or re-encode it.") from err
    if not small:
        raise ValueError(f"video {path!r} has no frames. Remove or re-encode it.")
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
