"""HMDB51 as published (Kuehne et al. 2011): `root/<class>/<video>.avi` and the official
split files `root/testTrainMulti_7030_splits/<class>_test_split<F>.txt`, whose lines are
`<video>.avi <0|1|2>` (1: train, 2: test, 0: neither).

Splits `train` and `test` of fold `fold` (1, 2 or 3); classes sorted."""

from __future__ import annotations

import dataclasses
import os

from dmd_jax.data.sources import FoldedSource, VideoSourceError, read_lines

SPLIT_FOLDER = "testTrainMulti_7030_splits"
CODES = {"train": "1", "test": "2"}


@dataclasses.dataclass(frozen=True)
class Source(FoldedSource):

    def classes(self) -> tuple[str, ...]:
        folder = os.path.join(self.root, SPLIT_FOLDER)
        if not os.path.isdir(folder):
            raise VideoSourceError(f"HMDB51's split files {folder!r} are missing: unpack "
                                   "test_train_splits.rar into config.data.root")
        suffix = f"_test_split{self.fold}.txt"
        return tuple(sorted(f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix)))

    def videos(self, split: str) -> list[tuple[str, int]]:
        out = []
        for label, name in enumerate(self.classes()):
            lines = read_lines(os.path.join(self.root, SPLIT_FOLDER,
                                            f"{name}_test_split{self.fold}.txt"),
                               "HMDB51's split file")
            out += [(os.path.join(self.root, name, video), label)
                    for video, code in (line.split() for line in lines) if code == CODES[split]]
        return out
