"""Any folder laid out `root/<split>/<class>/<video>`.

Classes are the sorted class folders of the first split; every split must have the same
ones, and each class folder at least one video file (checked before any work)."""

from __future__ import annotations

import dataclasses
import os

from dmd_jax.data.sources import VideoSource, VideoSourceError, list_files
from dmd_jax.errors import ConfigValueError


@dataclasses.dataclass(frozen=True)
class Source(VideoSource):

    def splits(self) -> list[str]:
        if not os.path.isdir(self.root):
            raise VideoSourceError(
                f"video folder {self.root!r} does not exist; set config.data.root to a folder "
                "laid out as <root>/<split>/<class>/<video file>")
        splits = sorted(d for d in os.listdir(self.root)
                        if os.path.isdir(os.path.join(self.root, d)))
        if not splits:
            raise VideoSourceError(f"video folder {self.root!r} has no split subfolders "
                                   "(train/, test/...)")
        return splits

    def classes(self) -> tuple[str, ...]:
        splits = self.splits()
        classes = self._class_folders(splits[0])
        for split in splits[1:]:
            other = self._class_folders(split)
            if other != classes:
                raise ConfigValueError(
                    f"split {split!r} of {self.root!r} has class folders {other[:5]}..., but "
                    f"{splits[0]!r} has {classes[:5]}...; they must match")
        return classes

    def videos(self, split: str) -> list[tuple[str, int]]:
        return [(os.path.join(self.root, split, name, file), label)
                for label, name in enumerate(self.classes())
                for file in list_files(os.path.join(self.root, split, name))]

    def check(self) -> None:
        classes = self.classes()
        if not classes:
            raise VideoSourceError(f"video folder {self.root!r} has no class folders in its "
                                   "splits")
        for split in self.splits():
            for name in classes:
                if not list_files(os.path.join(self.root, split, name)):
                    raise VideoSourceError(
                        f"class folder {os.path.join(self.root, split, name)!r} holds no video "
                        "file: add its videos or remove the folder from every split")

    def _class_folders(self, split: str) -> tuple[str, ...]:
        folder = os.path.join(self.root, split)
        return tuple(sorted(d for d in os.listdir(folder)
                            if os.path.isdir(os.path.join(folder, d))))
