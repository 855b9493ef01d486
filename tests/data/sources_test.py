"""The published datasets' layouts and split files, on small copies the tests write
(the same few PyAV-encoded files under the names the real datasets use)."""

import csv
import json
import os

import numpy as np
import pytest

from conftest import dataset_config
from dmd_jax.data import pipeline, sources
from video_files import ramp, write_video


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "clip.avi")
    write_video(path, ramp(12, 32, 40, 10), 10)
    return open(path, "rb").read()


def _put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _ucf101(root, clip):
    classes = ["ApplyEyeMakeup", "Archery"]
    _text(f"{root}/ucfTrainTestlist/classInd.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])
    train, test = [], []
    for i, name in enumerate(classes):
        for g in (8, 9, 1):
            video = f"{name}/v_{name}_g{g:02d}_c01.avi"
            _put(f"{root}/UCF-101/{video}", clip)
            (test if g == 1 else train).append(video)
    _text(f"{root}/ucfTrainTestlist/trainlist01.txt", [f"{v} {1 + classes.index(v.split('/')[0])}"
                                                      for v in train] + ["Archery/v_Archery_g10_c01.avi 2"])
    _text(f"{root}/ucfTrainTestlist/testlist01.txt", test)
    return classes


def test_ucf101_reads_the_official_lists_and_skips_listed_videos_not_on_disk(tmp_path, clip_bytes):
    root = str(tmp_path / "ucf")
    _ucf101(root, clip_bytes)
    source = sources.make("ucf101", {"root": root, "fold": 1})
    assert source.classes() == ("ApplyEyeMakeup", "Archery")
    train = source.videos("train")
    assert len(train) == 5 and [label for _, label in train] == [0, 0, 1, 1, 1]
    assert [os.path.basename(p) for p, _ in source.videos("test")] == [
        "v_ApplyEyeMakeup_g01_c01.avi", "v_Archery_g01_c01.avi"]
    data = dataset_config(str(tmp_path / "tfds"), "ucf101", root=root, frames=4, size=24)
    builder = pipeline.prepare(data)
    assert builder.info.splits["train"].num_examples == 4  # g10 is listed, not downloaded
    assert [os.path.basename(p) for p in pipeline.skipped_videos(builder)] == [
        "v_Archery_g10_c01.avi"]
    clips = pipeline.open_split(builder, data, "test").rows(np.arange(2))
    assert clips["video"].shape == (2, 4, 24, 24, 3) and sorted(clips["label"]) == [0, 1]
    with pytest.raises(ValueError, match="folds 1, 2 and 3"):
        sources.make("ucf101", {"root": root, "fold": 4})


def test_hmdb51_reads_the_7030_split_files(tmp_path, clip_bytes):
    root = str(tmp_path / "hmdb")
    for name in ("brush_hair", "cartwheel"):
        lines = []
        for k, code in enumerate((1, 1, 2, 0)):
            video = f"{name}_{k}.avi"
            _put(f"{root}/{name}/{video}", clip_bytes)
            lines.append(f"{video} {code}")
        _text(f"{root}/testTrainMulti_7030_splits/{name}_test_split1.txt", lines)
        _text(f"{root}/testTrainMulti_7030_splits/{name}_test_split2.txt", ["x.avi 1"])
    source = sources.make("hmdb51", {"root": root, "fold": 1})
    assert source.classes() == ("brush_hair", "cartwheel")
    assert [(os.path.basename(p), l) for p, l in source.videos("train")] == [
        ("brush_hair_0.avi", 0), ("brush_hair_1.avi", 0), ("cartwheel_0.avi", 1),
        ("cartwheel_1.avi", 1)]
    assert len(source.videos("test")) == 2  # code 0 (unused) is in neither split


def test_kinetics400_reads_the_annotation_csvs_in_either_downloaders_layout(tmp_path, clip_bytes):
    root = str(tmp_path / "k400")
    rows = {"train": [("abseiling", "aaa", 10), ("air drumming", "bbb", 0),
                      ("abseiling", "ccc", 5)],
            "val": [("air drumming", "ddd", 3)]}
    for split, entries in rows.items():
        os.makedirs(f"{root}/annotations", exist_ok=True)
        with open(f"{root}/annotations/{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for label, vid, start in entries:
                writer.writerow([label, vid, start, start + 10, split])
    _put(f"{root}/train/aaa_000010_000020.mp4", clip_bytes)  # flat (CVDF)
    _put(f"{root}/train/air_drumming/bbb_000000_000010.mp4", clip_bytes)  # class folders
    _put(f"{root}/val/ddd_000003_000013.mp4", clip_bytes)  # ccc never downloaded
    source = sources.make("kinetics400", {"root": root})
    assert source.splits() == ["train", "validation"]  # no test.csv
    assert source.classes() == ("abseiling", "air drumming")
    train = source.videos("train")
    assert [label for _, label in train] == [0, 1, 0]
    assert [os.path.exists(p) for p, _ in train] == [True, True, False]
    assert os.path.exists(source.videos("validation")[0][0])


def test_ssv2_reads_its_json_labels_and_is_never_flipped(tmp_path, clip_bytes):
    root = str(tmp_path / "ssv2")
    templates = {"Pushing something from left to right": "0",
                 "Pushing something from right to left": "1"}
    os.makedirs(f"{root}/labels")
    json.dump(templates, open(f"{root}/labels/labels.json", "w"))
    entries = [{"id": "7", "template": "Pushing [something] from right to left",
                "label": "pushing a cup from right to left", "placeholders": ["a cup"]},
               {"id": "3", "template": "Pushing [something] from left to right",
                "label": "pushing a pen from left to right", "placeholders": ["a pen"]}]
    json.dump(entries, open(f"{root}/labels/train.json", "w"))
    json.dump(entries[:1], open(f"{root}/labels/validation.json", "w"))
    for vid in ("7", "3"):
        _put(f"{root}/20bn-something-something-v2/{vid}.webm", clip_bytes)
    source = sources.make("ssv2", {"root": root})
    assert source.classes()[0] == "Pushing something from left to right"
    assert [(os.path.basename(p), l) for p, l in source.videos("train")] == [
        ("7.webm", 1), ("3.webm", 0)]
    assert not source.flip_safe


def test_a_missing_split_file_is_named(tmp_path):
    os.makedirs(tmp_path / "ucf" / "UCF-101")
    with pytest.raises(sources.VideoSourceError, match="classInd.txt"):
        sources.make("ucf101", {"root": str(tmp_path / "ucf")})


def test_a_dataset_of_your_own_is_found_by_its_module_path(tmp_path, clip_bytes, monkeypatch):
    """config.data.name='my_datasets.clips': a Source outside dmd_jax, no edit to it."""
    package = tmp_path / "my_datasets"
    os.makedirs(package)
    (package / "__init__.py").write_text("")
    (package / "clips.py").write_text(
        "import dataclasses, os\n"
        "from dmd_jax.data.sources import VideoSource\n\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Source(VideoSource):\n"
        "    def splits(self): return ['test']\n"
        "    def classes(self): return ('a', 'b')\n"
        "    def videos(self, split):\n"
        "        return [(os.path.join(self.root, f), i) for i, f in enumerate(['a.avi', 'b.avi'])]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("a.avi", "b.avi"):
        _put(str(tmp_path / "clips" / name), clip_bytes)
    data = dataset_config(str(tmp_path / "tfds"), "my_datasets.clips", root=str(tmp_path / "clips"),
                          frames=4, size=24)
    builder = pipeline.prepare(data)
    assert builder.info.splits["test"].num_examples == 2
    assert list(builder.info.features["label"].names) == ["a", "b"]
