"""Where a video dataset's files are and what they are labelled: one module per dataset.

A source lists, for each split, `(video path, label)` pairs; `dmd_jax.data.builders`
stores those videos (encoded, or as one raw view) in tfds array_record files. Add a
dataset by adding `dmd_jax/data/sources/<name>.py` with a `Source` class derived from
`VideoSource` (its dataclass fields are the dataset's own `config.data` keys, beside
`root`); `config.data.name='<name>'` then finds it (`dmd_jax.plugins`; a module of your
own by its dotted path). Nothing else changes.

The published layouts are read as they unpack, with their official split files
(`ucf101`, `hmdb51`, `kinetics400`, `ssv2`); `video_folder` is any
`root/<split>/<class>/<video>` tree. A video the split files name but the disk lacks
(Kinetics always has some) is skipped and counted like an undecodable one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import ClassVar

from dmd_jax import plugins
from dmd_jax.errors import ConfigValueError, UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class VideoSourceError(UserError, FileNotFoundError):
    """A dataset root whose layout a source cannot read."""


@dataclasses.dataclass(frozen=True)
class VideoSource:
    """The protocol: `splits`, `classes`, `videos(split)`; `flip_safe` says whether a
    horizontally flipped clip keeps its label (not when labels name a direction)."""

    root: str
    flip_safe: ClassVar[bool] = True

    def splits(self) -> list[str]:
        raise NotImplementedError

    def classes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def videos(self, split: str) -> list[tuple[str, int]]:
        """`(absolute path, label)` of every video the split lists, in a stable order
        (files that do not exist included: the builder skips and counts them)."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuses, before any work, a root this source cannot make a dataset of."""
        if not os.path.isdir(self.root):
            raise VideoSourceError(f"dataset root {self.root!r} does not exist; set "
                                   "config.data.root to the folder the dataset unpacked to")
        for split in self.splits():
            if not any(os.path.exists(path) for path, _ in self.videos(split)):
                raise VideoSourceError(f"split {split!r} of {self.root!r} has no video on "
                                       "disk: check config.data.root and the dataset's layout")

    def digest(self) -> str:
        """A hash of every listed video (path, size, label) and the split: a changed
        dataset is prepared anew, never read as the old one."""
        out = hashlib.sha256(repr((type(self).__module__, dataclasses.asdict(self),
                                   self.classes())).encode())
        for split in self.splits():
            for path, label in self.videos(split):
                size = os.path.getsize(path) if os.path.exists(path) else -1
                out.update(f"{split}|{os.path.relpath(path, self.root)}|{size}|{label}\n".encode())
        return out.hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class FoldedSource(VideoSource):
    """A dataset published with three train/test folds (UCF101, HMDB51)."""

    fold: int = 1

    def __post_init__(self):
        if self.fold not in (1, 2, 3):
            raise ConfigValueError(f"config.data.fold={self.fold}: {type(self).__module__} "
                                   "has folds 1, 2 and 3")

    def splits(self) -> list[str]:
        return ["train", "test"]


def names() -> list[str]:
    """Every dataset a source module of dmd_jax exists for."""
    return plugins.available(__name__, ("Source",))


def source_class(name: str) -> type[VideoSource]:
    """`dmd_jax.data.sources.<name>.Source`, or `Source` of the module at a dotted path
    (a dataset of your own, outside dmd_jax)."""
    return plugins.resolve(name, __name__, "config.data.name", ("Source",)).Source


def keys(name: str) -> tuple[str, ...]:
    """The dataset's own `config.data` keys: its source's fields."""
    return tuple(f.name for f in dataclasses.fields(source_class(name)))


def defaults(name: str) -> dict[str, object]:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else "")
            for f in dataclasses.fields(source_class(name))}


def make(name: str, settings: dict[str, object]) -> VideoSource:
    source = source_class(name)(**settings)
    source.check()
    return source


def list_files(folder: str) -> list[str]:
    """Video files directly in `folder`, sorted."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTENSIONS))


def read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise VideoSourceError(f"{what} {path!r} is missing: is config.data.root the folder "
                               "the dataset unpacked to?")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]
