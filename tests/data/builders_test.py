"""tfds builders: the synthetic dataset round-trips through array_record; video folders decode."""

import os

import numpy as np
import pytest

from conftest import dataset_config, tiny_config
from dmd_jax.data import builders, pipeline, sources, synthetic, video_codec
from video_files import write_video


def test_synthetic_dataset_is_array_record_with_all_splits(data_dir):
    builder = pipeline.make_builder(tiny_config(data_dir).data)
    assert builder.is_prepared()
    files = os.listdir(builder.data_dir)
    assert any("array_record" in f for f in files), files
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    assert sizes == dict(tiny_config(data_dir).data.split_sizes)
    assert builder.info.features["label"].names == list(synthetic.CLASSES)


def test_stored_clips_equal_the_renderer(data_dir):
    config = tiny_config(data_dir).data
    split = pipeline.Split(pipeline.make_builder(config), "test", config.frames, config.size)
    rows = split.rows(np.array([0, 5]))
    render = synthetic.RenderConfig(frames=config.frames, height=config.size, width=config.size)
    for row, index in enumerate([0, 5]):
        clip, label, _, _ = synthetic.render_example(config.seed, "test", index, render,
                                                     config.ceiling_cameras.test)
        np.testing.assert_array_equal(rows["video"][row], clip)
        assert rows["label"][row] == label and rows["id"][row] == index


def test_splits_join_with_a_plus(data_dir):
    """The cloud's training set is 'train+broad': the rows of one, then the other's."""
    config = tiny_config(data_dir).data
    builder = pipeline.make_builder(config)
    joined = pipeline.Split(builder, "train+broad", config.frames, config.size)
    train = pipeline.Split(builder, "train", config.frames, config.size)
    broad = pipeline.Split(builder, "broad", config.frames, config.size)
    assert len(joined) == len(train) + len(broad)
    np.testing.assert_array_equal(joined.rows(np.array([len(train)]))["video"][0],
                                  broad.rows(np.array([0]))["video"][0])
    with pytest.raises(ValueError, match="no split 'brood'"):
        pipeline.Split(builder, "train+brood", config.frames, config.size)


def test_ceiling_fractions_must_name_existing_splits():
    with pytest.raises(ValueError, match="splits the dataset does not have: \\['tset'\\]"):
        builders.SyntheticActionsConfig.create(synthetic.RenderConfig(), {"test": 8}, 0,
                                               {"tset": 0.5})


def test_config_changes_give_separate_datasets(data_dir):
    a = pipeline.make_builder(tiny_config(data_dir).data)
    b = pipeline.make_builder(tiny_config(data_dir, **{"data.seed": 1}).data)
    assert a.builder_config.name != b.builder_config.name
    assert not b.is_prepared()


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    """root/<split>/<class>/*.mp4: bright vs dark videos of 20 frames, 48x64 pixels."""
    root = tmp_path_factory.mktemp("videos")
    for split in ("train", "test"):
        for value, name in ((230, "bright"), (25, "dark")):
            os.makedirs(root / split / name)
            for k in range(2):
                frames = np.full((20, 48, 64, 3), value, np.uint8)
                frames[:, :, : 8 + 4 * k] = 128  # a stripe, so videos differ
                write_video(str(root / split / name / f"v{k}.mp4"), frames)
    (root / "train" / "bright" / "notes.txt").write_text("not a video")
    return str(root)


def test_video_folder_builder_decodes_resizes_and_labels(video_root, tmp_path):
    config = dataset_config(str(tmp_path), "video_folder", root=video_root, frames=4, size=24)
    builder = pipeline.prepare(config)
    assert builder.info.features["label"].names == ["bright", "dark"]
    assert set(builder.info.splits) == {"train", "test"}
    split = pipeline.Split(builder, "train", 4, 24)
    assert len(split) == 4  # notes.txt skipped
    rows = split.rows(np.arange(4))
    assert rows["video"].shape == (4, 4, 24, 24, 3) and rows["video"].dtype == np.uint8
    for video, label in zip(rows["video"], rows["label"]):
        centre = video[:, :, 12:].mean()  # right part: no stripe
        assert (centre > 180) if label == 0 else (centre < 70)


def test_raw_storage_keeps_the_view_that_encoded_storage_decodes(video_root, tmp_path):
    """storage='raw' (one stored uint8 view, the format before encoded storage) gives
    the clips the encoded dataset decodes on the fly; its report counts the stored bytes."""
    encoded = dataset_config(str(tmp_path), "video_folder", root=video_root, frames=4, size=24)
    raw = dataset_config(str(tmp_path), "video_folder", root=video_root, frames=4, size=24,
                         storage="raw")
    builders_ = {name: pipeline.prepare(c) for name, c in (("encoded", encoded), ("raw", raw))}
    assert "video" in builders_["raw"].info.features
    clips = {name: pipeline.Split(b, "train", 4, 24).rows(np.arange(4))["video"]
             for name, b in builders_.items()}
    np.testing.assert_array_equal(clips["raw"], clips["encoded"])
    report = pipeline.storage_report(builders_["raw"], raw)
    assert report["storage"] == "raw" and report["raw_bytes_per_clip"] == 4 * 24 * 24 * 3
    assert report["splits"]["train"]["bytes"] >= 4 * report["raw_bytes_per_clip"]


def test_video_decode_samples_frames_uniformly(tmp_path):
    frames = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(20)])
    path = str(tmp_path / "ramp.mp4")
    write_video(path, frames)
    clip = video_codec.uniform_view(open(path, "rb").read(), 5, 16, "ramp.mp4")
    means = clip.reshape(5, -1).mean(1)
    np.testing.assert_allclose(means, [0, 50, 100, 140, 190], atol=8)  # frames 0,5,10,14,19


def test_broken_video_is_named_in_the_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not really a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        video_codec.uniform_view(path.read_bytes(), 4, 16, "broken.mp4")


def test_missing_video_folder_is_named(tmp_path):
    config = dataset_config(str(tmp_path), "video_folder", root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        pipeline.prepare(config)


def test_real_config_splits_a_train_test_folder_into_the_four_splits(video_root, tmp_path):
    """configs/real.py's folder layout (train/ and test/ only) on videos this test wrote: the
    jobs' four splits, each clip of train in exactly one of train/unlabelled/calibration."""
    from conftest import REPO
    from dmd_jax.config_utils import load_config

    config = load_config(f"{REPO}/configs/real.py:folder,label").data
    config.update(root=video_root, data_dir=str(tmp_path), frames=4, size=24)
    builder = pipeline.prepare(config)
    from dmd_jax.errors import UserError
    with pytest.raises(UserError, match=r"'calibration' \('train\[90%:\]'.*holds no clips"):
        pipeline.open_split(builder, config, "calibration")  # 10% of 4 clips
    config.split_specs.update(unlabelled="train[50%:75%]", calibration="train[75%:]")
    splits = {name: pipeline.open_split(builder, config, name)
              for name in ("train", "unlabelled", "calibration", "test")}
    assert [len(splits[n]) for n in splits] == [2, 1, 1, 4]
    assert splits["unlabelled"].name == "unlabelled"
    whole = pipeline.Split(builder, "train", 4, 24).rows(np.arange(4))["video"]
    got = np.concatenate([splits[n].rows(np.arange(len(splits[n])))["video"]
                          for n in ("train", "unlabelled", "calibration")])
    np.testing.assert_array_equal(got, whole)
    stored = pipeline.Split(builder, "test", 2, 24).rows(np.arange(2))["video"]
    smaller = pipeline.Split(builder, "test", 2, 16).rows(np.arange(2))["video"]  # resized
    assert smaller.shape == (2, 2, 16, 16, 3)
    # Decoded anew at each size: the centre crop covers a slightly different part of the
    # left stripe (2 of 24 columns vs 2 of 16), hence the tolerance.
    np.testing.assert_allclose(smaller.mean((1, 2, 3, 4)), stored.mean((1, 2, 3, 4)), atol=8)


def test_undecodable_videos_are_skipped_named_and_counted(video_root, tmp_path, caplog):
    import logging
    import shutil

    root = tmp_path / "videos"
    shutil.copytree(video_root, root)
    (root / "train" / "dark" / "zero.mp4").write_bytes(b"")
    (root / "train" / "bright" / "garbage.avi").write_bytes(b"not a video at all")
    config = dataset_config(str(tmp_path / "tfds"), "video_folder", root=str(root), frames=4,
                            size=24)
    with caplog.at_level(logging.WARNING):
        builder = pipeline.prepare(config)
    assert len(pipeline.Split(builder, "train", 4, 24)) == 4  # the 4 good ones
    skipped = pipeline.skipped_videos(builder)
    assert sorted(os.path.basename(p) for p in skipped) == ["garbage.avi", "zero.mp4"]
    assert "garbage.avi" in caplog.text and "zero.mp4" in caplog.text


@pytest.mark.parametrize("emptied", ["class", "split"])
def test_an_empty_class_folder_or_split_is_refused_before_any_work(video_root, tmp_path,
                                                                  emptied):
    import shutil

    root = tmp_path / "videos"
    shutil.copytree(video_root, root)
    folders = [root / "test" / "dark"] if emptied == "class" else [root / "test" / "dark",
                                                                  root / "test" / "bright"]
    for folder in folders:
        for f in folder.iterdir():
            f.unlink()
    config = dataset_config(str(tmp_path / "tfds"), "video_folder", root=str(root))
    with pytest.raises(sources.VideoSourceError, match="test/(bright|dark).*no video"):
        pipeline.prepare(config)
    assert not (tmp_path / "tfds").exists()  # nothing prepared or written


def test_a_folder_that_gained_a_class_is_another_dataset(video_root, tmp_path):
    import shutil

    root = tmp_path / "videos"
    shutil.copytree(video_root, root)
    config = dataset_config(str(tmp_path / "tfds"), "video_folder", root=str(root), frames=4,
                            size=24)
    before = pipeline.make_builder(config).builder_config.name
    for split in ("train", "test"):
        shutil.copytree(root / split / "dark", root / split / "grey")
    after = pipeline.make_builder(config)
    assert after.builder_config.name != before  # prepared anew, never read as the old data
    assert list(after.info.features["label"].names) == ["bright", "dark", "grey"]


def test_folder_videos_are_stored_so_every_slice_holds_every_class():
    """A folder lists videos class by class; 'train[:50%]' of that order would be half
    the classes. The stored order spreads each class evenly: any slice is proportional."""
    videos = [(f"c{label}/v{k}.mp4", label) for label, count in enumerate((30, 10, 20))
              for k in range(count)]
    ordered = builders.stratified_order(videos)
    assert sorted(ordered) == sorted(videos) and ordered == builders.stratified_order(videos)
    labels = np.asarray([label for _, label in ordered])
    for start, stop in ((0, 30), (30, 60), (0, 6), (45, 57)):
        counts = np.bincount(labels[start:stop], minlength=3) / (stop - start)
        np.testing.assert_allclose(counts, [0.5, 1 / 6, 1 / 3], atol=0.17)
