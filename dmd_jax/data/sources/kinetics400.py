"""Kinetics-400 as the CVDF / ActivityNet downloads unpack (Kay et al. 2017): annotation
files `root/annotations/{train,val,test}.csv` (`label,youtube_id,time_start,time_end,
split[,is_cc]`) and videos named `<youtube_id>_<start:06d>_<end:06d>.<ext>` anywhere
under `root/<split folder>/` (flat or in class folders: both downloaders' layouts).

Splits `train`, `validation` (val.csv or validate.csv) and, when its file carries labels,
`test`; classes are the sorted labels of train.csv. A clip listed but not downloaded (some
always are missing from YouTube) is skipped and counted."""

from __future__ import annotations

import csv
import dataclasses
import functools
import os

from dmd_jax.data.sources import VIDEO_EXTENSIONS, VideoSource, VideoSourceError

ANNOTATIONS = {"train": ("train.csv",), "validation": ("val.csv", "validate.csv"),
               "test": ("test.csv",)}
FOLDERS = {"train": ("train",), "validation": ("val", "validate", "validation"),
           "test": ("test",)}


@dataclasses.dataclass(frozen=True)
class Source(VideoSource):

    def splits(self) -> list[str]:
        return [s for s in ANNOTATIONS if self._annotation(s) and self._labelled(s)]

    def classes(self) -> tuple[str, ...]:
        return tuple(sorted({row["label"] for row in self._rows("train")}))

    def videos(self, split: str) -> list[tuple[str, int]]:
        index = {name: label for label, name in enumerate(self.classes())}
        files = self._files(split)
        out = []
        for row in self._rows(split):
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_" \
                   f"{int(float(row['time_end'])):06d}"
            path = files.get(stem, os.path.join(self.root, FOLDERS[split][0], stem + ".mp4"))
            out.append((path, index[row["label"]]))
        return out

    def _annotation(self, split: str) -> str | None:
        for name in ANNOTATIONS[split]:
            path = os.path.join(self.root, "annotations", name)
            if os.path.isfile(path):
                return path
        return None

    def _labelled(self, split: str) -> bool:
        rows = self._rows(split)
        return bool(rows) and bool(rows[0].get("label"))

    @functools.lru_cache(maxsize=None)
    def _rows(self, split: str) -> list[dict[str, str]]:
        path = self._annotation(split)
        if path is None:
            raise VideoSourceError(
                f"Kinetics-400's {split} annotations ({' or '.join(ANNOTATIONS[split])}) are "
                f"missing from {os.path.join(self.root, 'annotations')!r}")
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    @functools.lru_cache(maxsize=None)
    def _files(self, split: str) -> dict[str, str]:
        """Every video file under the split's folder, by name without extension."""
        out = {}
        for folder in FOLDERS[split]:
            for parent, _, names in os.walk(os.path.join(self.root, folder)):
                out.update({os.path.splitext(n)[0]: os.path.join(parent, n)
                            for n in names if n.lower().endswith(VIDEO_EXTENSIONS)})
        return out
