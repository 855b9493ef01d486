"""Something-Something v2 as published (Goyal et al. 2017): `root/labels/labels.json`
(template -> class index), `root/labels/{train,validation}.json` (`id`, `template`, ...)
and videos `root/20bn-something-something-v2/<id>.webm`.

Splits `train` and `validation`; classes in index order. Labels name directions
("Pushing something from left to right"): never flipped."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import ClassVar

from dmd_jax.data.sources import VideoSource, VideoSourceError

VIDEO_FOLDER = "20bn-something-something-v2"


@dataclasses.dataclass(frozen=True)
class Source(VideoSource):
    flip_safe: ClassVar[bool] = False

    def splits(self) -> list[str]:
        return ["train", "validation"]

    def classes(self) -> tuple[str, ...]:
        index = self._json("labels")
        return tuple(sorted(index, key=lambda name: int(index[name])))

    def videos(self, split: str) -> list[tuple[str, int]]:
        index = {name: int(label) for name, label in self._json("labels").items()}
        return [(os.path.join(self.root, VIDEO_FOLDER, f"{entry['id']}.webm"),
                 index[entry["template"].replace("[", "").replace("]", "")])
                for entry in self._json(split)]

    @functools.lru_cache(maxsize=None)
    def _json(self, name: str):
        path = os.path.join(self.root, "labels", f"{name}.json")
        if not os.path.isfile(path):
            raise VideoSourceError(f"Something-Something v2's {path!r} is missing: is "
                                   "config.data.root the folder it unpacked to?")
        with open(path) as f:
            return json.load(f)
