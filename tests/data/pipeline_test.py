"""The input pipeline: step-indexed, host-sharded, resumable; clear errors for missing data."""

import numpy as np
import pytest

from conftest import dataset_config, tiny_config
from dmd_jax.data import loader, pipeline


def test_each_epoch_is_a_permutation():
    n, batch = 20, 4
    seen = np.concatenate([pipeline.train_indices(n, batch, s, 0, slice(None)) for s in range(5)])
    assert sorted(seen) == list(range(n))
    second = np.concatenate([pipeline.train_indices(n, batch, s, 0, slice(None)) for s in range(5, 10)])
    assert sorted(second) == list(range(n)) and not np.array_equal(seen, second)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = pipeline.train_indices(100, 8, 17, 3, slice(None))
    np.testing.assert_array_equal(a, pipeline.train_indices(100, 8, 17, 3, slice(None)))
    assert not np.array_equal(a, pipeline.train_indices(100, 8, 17, 4, slice(None)))


def test_batch_straddling_an_epoch_boundary():
    idx = pipeline.train_indices(10, 4, 2, 0, slice(None))  # positions 8..11: two epochs
    first = pipeline.train_indices(10, 4, 0, 0, slice(None))
    assert len(idx) == 4 and set(idx[:2]) <= set(range(10))
    assert not set(idx[:2]) & set(first)  # rows 8, 9 are the end of epoch 0's permutation


def test_hosts_split_the_global_batch_without_overlap():
    whole = pipeline.train_indices(50, 8, 9, 0, slice(None))
    parts = [pipeline.train_indices(50, 8, 9, 0, slice(h * 2, (h + 1) * 2)) for h in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_resumed_stream_equals_uninterrupted(data_dir):
    config = tiny_config(data_dir).data
    split = pipeline.Split(pipeline.make_builder(config), "train", config.frames, config.size)
    batches = list(loader.train_batches(split, 8, 0, 12, 5, slice(None)))
    resumed = list(loader.train_batches(split, 8, 7, 12, 5, slice(None)))
    assert len(batches) == 12 and len(resumed) == 5
    for expected, got in zip(batches[7:], resumed):
        np.testing.assert_array_equal(got["id"], expected["id"])
        np.testing.assert_array_equal(got["video"], expected["video"])


def test_eval_batches_cover_the_split_once_with_a_padding_mask(data_dir):
    config = tiny_config(data_dir).data
    split = pipeline.Split(pipeline.make_builder(config), "test", config.frames, config.size)
    batches = list(loader.eval_batches(split, 12, slice(None)))  # 32 clips: 12 + 12 + 8 real
    assert [b["mask"].sum() for b in batches] == [12, 12, 8]
    ids = np.concatenate([b["id"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(32))


def test_normalize_uses_kinetics_statistics():
    x = pipeline.normalize(np.full((1, 2, 2, 2, 3), 255, np.uint8))
    np.testing.assert_allclose(np.asarray(x), (1 - 0.45) / 0.225, rtol=1e-6)


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    config = tiny_config(str(tmp_path), **{"data.prepare": False}).data
    with pytest.raises(pipeline.DatasetNotPreparedError, match="data.prepare=True"):
        pipeline.prepare(config)
    assert not pipeline.make_builder(config).is_prepared()  # nothing generated behind our back


def test_unknown_split_is_named(data_dir):
    config = tiny_config(data_dir).data
    with pytest.raises(ValueError, match="validation"):
        pipeline.Split(pipeline.make_builder(config), "validation", config.frames, config.size)


def test_unknown_dataset_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'kinetics'.*available: .*'kinetics400'"):
        pipeline.make_builder(tiny_config(str(tmp_path), **{"data.name": "kinetics"}).data)


def test_split_specs_slice_a_published_split_into_the_jobs_splits(data_dir):
    """UCF101/HMDB51 ship train/test only: the unlabelled pool and the calibration set are
    slices of train, and each slice's ids are its own positions (what labelling resumes on)."""
    config = tiny_config(data_dir, **{"data.split_specs": {"unlabelled": "train[:25%]",
                                                           "calibration": "train[25%:]"}}).data
    builder = pipeline.make_builder(config)
    pool = pipeline.open_split(builder, config, "unlabelled")
    calibration = pipeline.open_split(builder, config, "calibration")
    test = pipeline.open_split(builder, config, "test")  # not in split_specs: as published
    assert (pool.name, len(pool), len(calibration), len(test)) == ("unlabelled", 16, 48, 32)
    train = pipeline.Split(builder, "train", config.frames, config.size)
    got = calibration.rows(np.arange(3))
    np.testing.assert_array_equal(got["id"], [0, 1, 2])
    np.testing.assert_array_equal(got["video"], train.rows(np.arange(16, 19))["video"])
    with pytest.raises(ValueError, match="'validation'.*slices like"):
        pipeline.Split(builder, "validation[:10%]", config.frames, config.size)


def test_resample_to_another_models_clip_shape():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 255, (2, 16, 8, 8, 3), dtype=np.uint8)
    assert pipeline.resample(clips, 16, 8) is clips  # right shape: untouched
    out = np.asarray(pipeline.resample(clips, 4, 8))  # temporal only: frames 0, 5, 10, 15
    np.testing.assert_array_equal(out, clips[:, [0, 5, 10, 15]])
    flat = np.full((1, 4, 8, 8, 3), 77, np.uint8)
    out = np.asarray(pipeline.resample(flat, 3, 5))
    assert out.shape == (1, 3, 5, 5, 3) and out.dtype == np.uint8 and (out == 77).all()
    halves = np.zeros((1, 2, 8, 8, 3), np.uint8)
    halves[:, :, :, 4:] = 200  # left half dark, right half bright: stays so at half size
    out = np.asarray(pipeline.resample(halves, 2, 4))
    assert (out[..., :, :2, :] < 60).all() and (out[..., :, 2:, :] > 140).all()
