"""Streams of corrupted clips: the protocols' row order and per-clip determinism."""

import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.data import corruptions, streams

NAMES = ("gaussian_noise", "fog", "reverse")


def test_reset_protocol_one_stream_per_condition():
    out = streams.make_streams("reset", 70, NAMES, (3, 5), batch_size=16, seed=0)
    assert [s.name for s in out] == [f"{n}@{s}" for s in (3, 5) for n in NAMES]
    assert all(len(s) == 64 for s in out)  # the partial last batch is dropped
    np.testing.assert_array_equal(out[0].clip, out[-1].clip)  # same clip order everywhere
    assert len(set(out[0].clip)) == 64


def test_continual_and_mixed_hold_the_same_rows():
    (continual,) = streams.make_streams("continual", 32, NAMES, (5,), 8, seed=0)
    (mixed,) = streams.make_streams("mixed", 32, NAMES, (5,), 8, seed=0)
    assert list(continual.row_names()[::32]) == [f"{n}@5" for n in NAMES]
    as_set = lambda s: sorted(zip(s.clip.tolist(), s.row_names().tolist()))
    assert as_set(continual) == as_set(mixed)
    assert not np.array_equal(continual.row_names(), mixed.row_names())


def test_bad_protocol_and_corruption_are_clear_errors():
    with pytest.raises(ValueError, match="protocol"):
        streams.make_streams("shuffled", 32, NAMES, (5,), 8, 0)
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        streams.make_streams("reset", 32, ("snow",), (5,), 8, 0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        streams.make_streams("reset", 4, NAMES, (5,), 8, 0)


def test_a_clip_is_corrupted_the_same_way_in_any_batch():
    clips = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 4, 8, 8, 3), np.uint8))
    ids = jnp.asarray([7, 3, 9, 1])
    together = corruptions.corrupt_clips(clips, ids, "gaussian_noise", 5, seed=0)
    alone = corruptions.corrupt_clips(clips[2:3], ids[2:3], "gaussian_noise", 5, seed=0)
    np.testing.assert_array_equal(together[2], alone[0])
    other_id = corruptions.corrupt_clips(clips[2:3], ids[:1], "gaussian_noise", 5, seed=0)
    assert not np.array_equal(other_id[0], alone[0])
