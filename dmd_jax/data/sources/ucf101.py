"""UCF101 as published (Soomro et al. 2012): `root/UCF-101/<Class>/v_<Class>_gGG_cCC.avi`
and the official split lists `root/ucfTrainTestlist/{classInd,trainlist0F,testlist0F}.txt`.

Splits `train` and `test` of fold `fold` (1, 2 or 3); classes in `classInd.txt` order."""

from __future__ import annotations

import dataclasses
import os

from dmd_jax.data.sources import FoldedSource, read_lines


@dataclasses.dataclass(frozen=True)
class Source(FoldedSource):

    def classes(self) -> tuple[str, ...]:
        lines = read_lines(self._list("classInd.txt"), "UCF101's class list")
        return tuple(line.split()[1] for line in sorted(lines, key=lambda l: int(l.split()[0])))

    def videos(self, split: str) -> list[tuple[str, int]]:
        index = {name: label for label, name in enumerate(self.classes())}
        entries = read_lines(self._list(f"{split}list0{self.fold}.txt"), f"UCF101's {split} list")
        out = []
        for entry in entries:
            relative = entry.split()[0]  # trainlist lines end with a 1-based class number
            out.append((os.path.join(self.root, "UCF-101", relative),
                        index[relative.split("/")[0]]))
        return out

    def _list(self, name: str) -> str:
        return os.path.join(self.root, "ucfTrainTestlist", name)
