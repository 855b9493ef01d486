"""Encoded storage, training and evaluation views, and the grain loader, on real video
files this module writes with PyAV: several sizes, frame rates and codecs, one with a
variable frame rate, one corrupt file and one of zero length."""

import logging
import os

import numpy as np
import pytest

from conftest import dataset_config, tiny_config
from dmd_jax.data import builders, loader, pipeline, video_codec, views
from video_files import ramp, write_video

# name: (frames, height, width, fps, codec); every frame i of a video is grey 6*i.
VIDEOS = {"wide.mp4": (30, 48, 80, 25, "mpeg4"), "tall.avi": (24, 64, 40, 12, "mpeg4"),
          "h264.mp4": (36, 40, 72, 30, "libx264"), "square.mkv": (20, 56, 56, 15, "mpeg4")}
VFR_PTS_MS = list(np.cumsum([0] + [50 if i % 2 else 150 for i in range(19)]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/{train,test}/{one,two}/: the videos above (test holds two of them), a
    variable-frame-rate one, a corrupt and an empty file; prepared encoded."""
    root = tmp_path_factory.mktemp("encoded_videos")
    for split in ("train", "test"):
        for name in ("one", "two"):
            os.makedirs(root / split / name)
            chosen = VIDEOS if split == "train" else dict(list(VIDEOS.items())[:1])
            for file, (frames, height, width, fps, codec) in chosen.items():
                write_video(str(root / split / name / file), ramp(frames, height, width, 6),
                            fps, codec)
    write_video(str(root / "train" / "one" / "vfr.mp4"), ramp(20, 48, 64, 6), 10,
                pts_ms=[int(t) for t in VFR_PTS_MS])
    (root / "train" / "two" / "corrupt.mp4").write_bytes(os.urandom(3000))
    (root / "train" / "two" / "empty.avi").write_bytes(b"")
    data = dataset_config(str(tmp_path_factory.mktemp("tfds")), "video_folder",
                          root=str(root), frames=4, size=24)
    return root, data


@pytest.fixture(scope="module")
def prepared(folder):
    root, data = folder
    return pipeline.prepare(data), data


def _split(prepared, name="train", **view_settings):
    builder, data = prepared
    data = data.copy_and_resolve_references()
    data.views.update(view_settings)
    return pipeline.open_split(builder, data, name)


def test_encoded_dataset_keeps_the_files_bytes_and_their_frame_counts(prepared, folder):
    builder, _ = prepared
    root, _ = folder
    assert sorted(os.path.basename(p) for p in pipeline.skipped_videos(builder)) == [
        "corrupt.mp4", "empty.avi"]
    source = builder.as_data_source(split="train")
    rows = {e["path"].decode(): e for e in source.__getitems__(list(range(len(source))))}
    assert len(rows) == 9  # 5 decodable videos of class one, 4 of class two
    for path, example in rows.items():
        assert example["encoded"] == (root / path).read_bytes()  # stored as published
        name = os.path.basename(path)
        if name == "vfr.mp4":
            assert example["num_frames"] == 20
            assert example["fps"] == pytest.approx(19 / 1.95, rel=0.02)  # 19 gaps, 1.95 s
        else:
            frames, height, width, fps, _ = VIDEOS[name]
            assert (example["num_frames"], example["height"], example["width"]) == (
                frames, height, width)
            assert example["fps"] == pytest.approx(fps, rel=1e-3)


def test_storage_report_compares_encoded_with_raw_bytes(prepared):
    builder, data = prepared
    report = pipeline.storage_report(builder, data)
    train = report["splits"]["train"]
    assert train["clips"] == 9 and train["bytes_per_clip"] > 0
    assert report["raw_bytes_per_clip"] == 4 * 24 * 24 * 3  # one stored uint8 view
    assert train["bytes_per_clip"] == pytest.approx(
        train["bytes"] / train["clips"])


def test_evaluation_views_are_uniform_windows_and_three_crops(prepared):
    split = _split(prepared, sampling_rate=2, temporal=2, spatial=3)
    index = _index_of(split, "wide.mp4")  # 30 frames, 48x80: short side scaled to 24
    video = split.rows(np.array([index]))["video"][0]
    assert video.shape == (6, 4, 24, 24, 3)  # 2 windows x 3 crops
    grey = video[..., 0].astype(float)
    # Windows of 4 frames at rate 2 start at frames 0 and 30 - 8 = 22.
    right = grey[:, :, :, -3:].mean((2, 3))  # the right edge of each crop: no +60 stripe
    np.testing.assert_allclose(right[2], 6 * np.array([0, 2, 4, 6]), atol=6)  # right crop
    np.testing.assert_allclose(right[5], 6 * np.array([22, 24, 26, 28]), atol=6)
    stripe = grey[0, :, :, :3].mean() - grey[2, :, :, -3:].mean()  # left crop, right crop
    assert stripe == pytest.approx(60, abs=10)  # the left crop's edge is the +60 stripe


def test_training_views_are_random_per_step_and_row_and_reproducible(prepared):
    split = _split(prepared, sampling_rate=2, train_scale=(1.0, 1.5), flip=True)
    indices = np.arange(len(split))
    a = split.train_rows(indices, seed=3, step=5, positions=np.arange(len(split)))
    b = split.train_rows(indices, seed=3, step=5, positions=np.arange(len(split)))
    c = split.train_rows(indices, seed=3, step=6, positions=np.arange(len(split)))
    assert a["video"].shape == (9, 4, 24, 24, 3)
    np.testing.assert_array_equal(a["video"], b["video"])
    assert not np.array_equal(a["video"], c["video"])
    config = split.views
    starts = [views.train_view(config, 30, views.rng_for(3, s, 0), True).indices[0]
              for s in range(40)]
    assert min(starts) >= 0 and max(starts) <= 30 - 8 and len(set(starts)) > 5
    shorts = {views.train_view(config, 30, views.rng_for(3, s, 0), True).short_side
              for s in range(40)}
    assert min(shorts) >= 24 and max(shorts) <= 36 and len(shorts) > 3
    flips = [views.train_view(config, 30, views.rng_for(3, s, 0), True).flip for s in range(40)]
    assert 5 < sum(flips) < 35
    assert not any(views.train_view(config, 30, views.rng_for(3, s, 0), False).flip
                   for s in range(40))


def test_a_flipped_view_is_the_mirror_image(prepared):
    split = _split(prepared)
    example = split._read(np.array([_index_of(split, "square.mkv")]))[0]
    window = np.arange(4)
    plain = split._render(example, [views.View(window, 24, 0.5, 0.5, False)])[0]
    mirrored = split._render(example, [views.View(window, 24, 0.5, 0.5, True)])[0]
    np.testing.assert_array_equal(mirrored, plain[:, :, ::-1])
    assert plain[..., :12, 0].mean() > plain[..., 12:, 0].mean() + 30  # stripe on the left


def test_the_synthetic_datasets_left_right_twins_are_never_flipped(data_dir):
    builder = pipeline.make_builder(tiny_config(data_dir).data)
    flippable = dict(zip(builder.info.features["label"].names,
                         builders.flippable_classes(builder)))
    assert not flippable["move_right"] and not flippable["rotate_cw"]
    assert not flippable["left_then_right"] and flippable["move_up"] and flippable["grow"]


def test_worker_processes_give_the_same_batches_as_threads(prepared):
    split = _split(prepared, sampling_rate=2, train_scale=(1.0, 1.5), flip=True)
    threads = list(loader.train_batches(split, 4, 3, 6, 7, slice(None), workers=0))
    processes = list(loader.train_batches(split, 4, 3, 6, 7, slice(None), workers=2))
    assert len(threads) == len(processes) == 3
    for a, b in zip(threads, processes):
        np.testing.assert_array_equal(a["id"], b["id"])
        np.testing.assert_array_equal(a["video"], b["video"])


def test_bad_view_settings_are_refused(prepared):
    with pytest.raises(ValueError, match="temporal > 1 needs a sampling_rate"):
        _split(prepared, temporal=2)
    with pytest.raises(ValueError, match="spatial=2"):
        _split(prepared, sampling_rate=1, spatial=2)
    with pytest.raises(ValueError, match=r"no keys \['jitter'\]"):
        _split(prepared, jitter=1)


def test_reencoding_to_a_short_side_shrinks_big_videos(tmp_path):
    path = str(tmp_path / "big.mp4")
    write_video(path, ramp(12, 96, 128, 6), 10)
    data = open(path, "rb").read()
    small = video_codec.reencode(data, 48, "big.mp4")
    info = video_codec.probe(small, "small")
    assert (info.height, info.width, info.num_frames) == (48, 64, 12)
    assert video_codec.reencode(small, 48, "small") == small  # already small enough


def test_damaged_stored_bytes_are_a_clear_error_naming_the_video(prepared, tmp_path):
    split = _split(prepared)
    example = dict(split._read(np.array([0]))[0])
    example["encoded"] = example["encoded"][:40]
    with pytest.raises(pipeline.DatasetCorruptError, match=example["path"].decode()):
        split._render(example, views.eval_views(split.views, int(example["num_frames"])))


def _index_of(split, name: str) -> int:
    source = split._builder.as_data_source(split=split._split_spec)
    names = [os.path.basename(e["path"].decode())
             for e in source.__getitems__(list(range(len(source))))]
    return names.index(name)


def test_prepare_warns_naming_each_skipped_video(folder, tmp_path, caplog):
    root, data = folder
    data = data.copy_and_resolve_references()
    data.data_dir = str(tmp_path)
    with caplog.at_level(logging.WARNING):
        pipeline.prepare(data)
    assert "corrupt.mp4" in caplog.text and "empty.avi" in caplog.text
