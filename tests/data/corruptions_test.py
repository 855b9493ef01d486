"""Video corruptions: shapes kept, deterministic, every one changes the clip, severity grows."""

import jax
import numpy as np
import pytest

from dmd_jax.data import corruptions, synthetic

CLIP = synthetic.render_clip(synthetic.clip_rng(0, "test", 3), 0, synthetic.RenderConfig())[0]
KEY = jax.random.key(0)
NAMES = sorted(corruptions.CORRUPTIONS)


def _distance(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_determinism_and_change(name):
    jitted = jax.jit(corruptions.corrupt, static_argnums=(1, 2))
    out = jitted(CLIP, name, 5, KEY)
    assert out.shape == CLIP.shape and out.dtype == CLIP.dtype
    np.testing.assert_array_equal(out, jitted(CLIP, name, 5, KEY))  # same key, same clip
    eager = corruptions.corrupt(CLIP, name, 5, KEY)  # XLA may fuse differently: 1 level apart
    assert np.abs(np.asarray(out, np.int32) - np.asarray(eager, np.int32)).max() <= 1
    assert _distance(out, CLIP) > 0.5, name
    as_float = corruptions.corrupt(CLIP.astype(np.float32), name, 5, KEY)
    assert as_float.dtype == np.float32


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"jumble", "saturate", "freeze"}))
def test_distortion_grows_with_severity(name):
    distances = [np.mean([_distance(corruptions.corrupt(CLIP, name, s, jax.random.key(i)), CLIP)
                          for i in range(3)]) for s in (1, 3, 5)]
    assert distances[0] < distances[1] < distances[2], (name, distances)


def test_saturate_moves_away_from_identity_both_ways():
    # ImageNet-C's saturate first removes colour (severities 1-2), then over-saturates (3-5).
    low, high = (corruptions.corrupt(CLIP, "saturate", s, KEY) for s in (2, 5))
    spread = lambda c: float(np.asarray(c, np.float32).std(axis=-1).mean())
    assert spread(low) < spread(CLIP) < spread(high)


def _frame_sources(name, severity, key=KEY):
    """Which original frame each output frame shows (frames are made distinct)."""
    frames = np.arange(8, dtype=np.uint8)[:, None, None, None] * 30
    clip = np.broadcast_to(frames, (8, 4, 4, 3)).copy()
    return np.asarray(corruptions.corrupt(clip, name, severity, key))[:, 0, 0, 0] // 30


def test_temporal_corruptions_permute_or_drop_frames():
    assert list(_frame_sources("reverse", 5)) == [7, 6, 5, 4, 3, 2, 1, 0]
    assert list(_frame_sources("frame_rate", 4)) == [0, 0, 0, 0, 4, 4, 4, 4]
    jumbled = _frame_sources("jumble", 5)
    assert sorted(jumbled) == list(range(8)) and list(jumbled) != list(range(8))
    for severity, still in ((1, 2), (5, 6)):  # round(8 * 0.2) and round(8 * 0.8) - 1 repeats
        frozen = _frame_sources("freeze", severity)
        start = int(np.argmax(np.diff(frozen) == 0))
        assert list(frozen[:start + 1]) == list(range(start + 1))
        assert len(set(frozen[start:])) == 1 and len(frozen) - start - 1 >= still - 1


def test_batch_uses_independent_keys():
    batch = np.stack([CLIP, CLIP])
    out = corruptions.corrupt_batch(batch, "gaussian_noise", 3, KEY)
    assert out.shape == batch.shape and not np.array_equal(out[0], out[1])


def test_bad_name_or_severity():
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corruptions.corrupt(CLIP, "rain", 3, KEY)
    with pytest.raises(ValueError, match="severity must be 1-5"):
        corruptions.corrupt(CLIP, "fog", 6, KEY)


def test_contact_sheet_has_a_row_per_corruption_and_a_column_per_severity():
    sheet = corruptions.contact_sheet(CLIP, KEY, frames=(0, 4), gap=2)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (len(NAMES) * (32 + 2), 6 * (2 * 32 + 2), 3)


def test_adding_corruptions_keeps_the_noise_of_the_methods_fifteen():
    """Each corruption's noise is keyed by a code; the 15 of METHODS.md keep the codes
    they had before salt, pepper and zoom_blur joined (their results stay comparable)."""
    old = sorted(corruptions.METHODS_CORRUPTIONS)
    assert [corruptions._name_code(n) for n in old] == list(range(15))
    new = [corruptions._name_code(n) for n in ("salt", "pepper", "zoom_blur")]
    assert sorted(new) == [15, 16, 17]


def test_salt_and_pepper_whiten_and_blacken_pixels():
    salty = np.asarray(corruptions.corrupt(CLIP, "salt", 3, KEY))
    peppered = np.asarray(corruptions.corrupt(CLIP, "pepper", 3, KEY))
    assert (salty == 255).all(-1).mean() > (CLIP == 255).all(-1).mean() + 0.05
    assert (peppered == 0).all(-1).mean() > (CLIP == 0).all(-1).mean() + 0.05


HOST = sorted(corruptions.host_corruptions.HOST_CORRUPTIONS)
# A textured clip big enough for codecs to have something to lose (64x64, 12 frames).
TEXTURED = np.clip(np.kron(np.random.default_rng(1).integers(0, 255, (12, 16, 16, 3)),
                           np.ones((1, 4, 4, 1))), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", HOST)
def test_host_corruptions_keep_shape_are_keyed_by_clip_and_change_it(name):
    host = corruptions.host_corruptions
    out = host.corrupt(TEXTURED, name, 5, seed=0, clip_id=4)
    assert out.shape == TEXTURED.shape and out.dtype == np.uint8
    again = host.corrupt(TEXTURED, name, 5, seed=0, clip_id=4)
    if name in host.NOT_BIT_EXACT:  # x265 is not bit-exact (module docstring)
        assert _distance(out, again) < 0.5 * _distance(out, TEXTURED)
    else:
        np.testing.assert_array_equal(out, again)
    assert _distance(out, TEXTURED) > 1.0, name
    assert corruptions.on_host(name) and name in corruptions.ALL_CORRUPTIONS


@pytest.mark.parametrize("name", ["h264_crf", "h265_crf", "h264_abr", "rain"])
def test_host_corruptions_grow_with_severity(name):
    host = corruptions.host_corruptions
    low, high = (_distance(host.corrupt(TEXTURED, name, s, 0, 0), TEXTURED) for s in (1, 5))
    assert low < high, (name, low, high)


def test_bit_errors_damage_frames_but_every_frame_is_answered():
    host = corruptions.host_corruptions
    big = np.repeat(np.repeat(TEXTURED, 4, axis=1), 4, axis=2)  # 256x256: enough bytes to hit
    out = host.bit_error(big, 5, np.random.default_rng(0))
    assert out.shape == big.shape
    clean = host._reencode(big, "libx264", crf=host.SOURCE_CRF)
    assert not np.array_equal(out, clean)  # some byte of the stream was hit


def test_shifted_splits_accept_host_corruptions():
    assert corruptions.parse_shifted("test@h265_abr@3") == ("test", "h265_abr", 3)
    with pytest.raises(ValueError, match="h265_abr"):
        corruptions.parse_shifted("test@h266@3")
