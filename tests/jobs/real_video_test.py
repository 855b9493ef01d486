"""configs/real.py end to end on a folder of real video files this test writes with PyAV
(several sizes and frame rates, one variable-frame-rate, one corrupt and one empty file):
the edge and teacher fine-tuned on augmented views, labels over multi-view evaluation,
the switcher, the hybrid (its GFLOPs counting every view) and adaptation."""

import json
import os

import numpy as np

from dmd_jax.config_utils import load_config
from dmd_jax.data import pipeline
from dmd_jax.jobs import pipeline as pipeline_job
from conftest import REPO
from video_files import write_video

SIZES = [(36, 48, 10), (48, 36, 15), (40, 40, 25), (30, 54, 12)]  # height, width, fps


def _folder(root):
    """train: 10 videos per class; test: 4. Class 'bright' is light with a moving bar,
    'dark' dark: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 4)):
        for name, level in (("bright", 200), ("dark", 40)):
            os.makedirs(root / split / name)
            for k in range(count):
                height, width, fps = SIZES[k % len(SIZES)]
                frames = np.full((16 + k, height, width, 3), level, np.uint8)
                frames += rng.integers(0, 20, frames.shape, dtype=np.uint8)
                for t in range(len(frames)):
                    frames[t, :, (3 * t) % width: (3 * t) % width + 4] = 255 - level
                pts = [int(p) for p in np.cumsum([0] + [40, 120] * 20)[:len(frames)]]
                write_video(str(root / split / name / f"v{k}.mp4"), frames, fps,
                            pts_ms=pts if k == 1 else None)
    (root / "train" / "dark" / "corrupt.mp4").write_bytes(os.urandom(2000))
    (root / "train" / "bright" / "empty.avi").write_bytes(b"")


def test_real_config_runs_every_stage_on_a_folder_of_videos(tmp_path):
    root = tmp_path / "videos"
    _folder(root)
    config = load_config(f"{REPO}/configs/real.py:folder,pipeline,tiny")
    config.data.update(root=str(root), data_dir=str(tmp_path / "tfds"))
    config.data.split_specs.update(train="train[:50%]", unlabelled="train[50%:75%]",
                                   calibration="train[75%:]")
    workdir = str(tmp_path / "run")
    pipeline_job.run(config, workdir)

    def summary(stage):
        return json.load(open(os.path.join(workdir, stage, "summary.json")))

    edge = summary("edge")
    assert edge["num_train_clips"] == 10 and edge["skipped_videos"] == 2  # half of 20
    edge_config = json.load(open(os.path.join(workdir, "edge", "config.json")))
    assert edge_config["data"]["views"]["flip"] and edge_config["data"]["views"]["sampling_rate"] == 2
    train = pipeline.open_split(pipeline.make_builder(config.data), config.data, "train")
    assert set(train.labels()) == {0, 1}  # the first half of a class-ordered folder: both
    labels = summary("label")["splits"]
    assert labels["test"]["num_clips"] == 8 and labels["unlabelled"]["num_clips"] == 5
    hybrid = summary("hybrid")
    assert hybrid["operating_point"]["eval_views"] == 6  # 2 windows x 3 crops
    adapt = summary("adapt")
    assert set(adapt["methods"]) >= {"source", "cema"}
