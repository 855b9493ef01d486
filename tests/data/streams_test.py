"""Streams of corrupted clips: the protocols' row order and per-clip determinism."""

import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.data import corruptions, streams

NAMES = ("gaussian_noise", "fog", "reverse")
P = streams.Protocol.parse


def unlabelled(n):
    return np.zeros(n, np.int32)


def test_reset_protocol_one_stream_per_condition():
    out = streams.make_streams(P("reset"), unlabelled(70), NAMES, (3, 5), batch_size=16, seed=0)
    assert [s.name for s in out] == [f"{n}@{s}" for s in (3, 5) for n in NAMES]
    assert all(len(s) == 64 for s in out)  # the partial last batch is dropped
    np.testing.assert_array_equal(out[0].clip, out[-1].clip)  # same clip order everywhere
    assert len(set(out[0].clip)) == 64


def test_continual_and_mixed_hold_the_same_rows():
    (continual,) = streams.make_streams(P("continual"), unlabelled(32), NAMES, (5,), 8, seed=0)
    (mixed,) = streams.make_streams(P("mixed"), unlabelled(32), NAMES, (5,), 8, seed=0)
    assert list(continual.row_names()[::32]) == [f"{n}@5" for n in NAMES]
    as_set = lambda s: sorted(zip(s.clip.tolist(), s.row_names().tolist()))
    assert as_set(continual) == as_set(mixed)
    assert not np.array_equal(continual.row_names(), mixed.row_names())


def test_gradual_walks_the_severities_up_and_down_per_corruption():
    (gradual,) = streams.make_streams(P("gradual"), unlabelled(16), NAMES[:2], (1, 3, 5), 8, 0)
    segments = list(gradual.row_names()[::16])
    assert segments == ["gaussian_noise@1", "gaussian_noise@3", "gaussian_noise@5",
                        "gaussian_noise@3", "gaussian_noise@1", "fog@1", "fog@3", "fog@5",
                        "fog@3", "fog@1"]
    assert all(sorted(gradual.clip[i:i + 16]) == sorted(gradual.clip[:16])
               for i in range(0, len(gradual), 16))  # every segment shows every clip once
    with pytest.raises(ValueError, match="at least two"):
        streams.make_streams(P("gradual"), unlabelled(16), NAMES, (5,), 8, 0)


def test_correlated_streams_come_in_class_runs():
    labels = np.repeat(np.arange(12), 40)[np.random.default_rng(0).permutation(480)]
    iid = streams.make_streams(P("reset"), labels, NAMES[:1], (5,), 16, seed=3)[0]
    out = streams.make_streams(P("correlated"), labels, NAMES, (5,), 16, seed=3)
    assert [s.name for s in out] == [f"{n}@5" for n in NAMES]  # a stream per condition
    ordered = out[0]
    assert sorted(ordered.clip) == sorted(iid.clip)  # the same clips, reordered
    runs = lambda clips: 1 + np.count_nonzero(np.diff(labels[clips]))
    classes_per_batch = lambda clips: np.mean([len(set(labels[clips[i:i + 16]]))
                                               for i in range(0, len(clips), 16)])
    assert runs(ordered.clip) < runs(iid.clip) / 5
    assert classes_per_batch(ordered.clip) < 4 < classes_per_batch(iid.clip)
    loose = streams.make_streams(P("correlated:100"), labels, NAMES, (5,), 16, seed=3)[0]
    assert runs(ordered.clip) < runs(loose.clip)  # a large concentration mixes more classes
    again = streams.make_streams(P("correlated"), labels, NAMES, (5,), 16, seed=3)[0]
    np.testing.assert_array_equal(again.clip, ordered.clip)


def test_protocol_specs():
    assert P("correlated") == streams.Protocol("correlated", 0.1)
    assert P("correlated:0.5").folder == "correlated-0.5"
    assert P("continual").folder == "continual" and not P("continual").resets_per_segment
    for bad, match in (("shuffled", "unknown adapt protocol"), ("reset:2", "takes no argument"),
                       ("correlated:-1", "positive"), ("correlated:x", "positive")):
        with pytest.raises(ValueError, match=match):
            P(bad)


def test_bad_corruption_and_short_split_are_clear_errors():
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        streams.make_streams(P("reset"), unlabelled(32), ("snow",), (5,), 8, 0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        streams.make_streams(P("reset"), unlabelled(4), NAMES, (5,), 8, 0)


def test_a_clip_is_corrupted_the_same_way_in_any_batch():
    clips = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 4, 8, 8, 3), np.uint8))
    ids = jnp.asarray([7, 3, 9, 1])
    together = corruptions.corrupt_clips(clips, ids, "gaussian_noise", 5, seed=0)
    alone = corruptions.corrupt_clips(clips[2:3], ids[2:3], "gaussian_noise", 5, seed=0)
    np.testing.assert_array_equal(together[2], alone[0])
    other_id = corruptions.corrupt_clips(clips[2:3], ids[:1], "gaussian_noise", 5, seed=0)
    assert not np.array_equal(other_id[0], alone[0])


def test_a_mixed_stream_corrupts_each_row_on_the_host_or_the_device(data_dir):
    """`mixed` rows under a codec corruption (host) and fog (device): each clip equals its
    own corruption of the clean clip, keyed by the stream's seed and the clip's id."""
    from conftest import tiny_config
    from dmd_jax import parallel
    from dmd_jax.data import host_corruptions, pipeline

    config = tiny_config(data_dir).data
    split = pipeline.Split(pipeline.make_builder(config), "test", config.frames, config.size)
    (stream,) = streams.make_streams(P("mixed"), unlabelled(len(split)), ("fog", "h264_crf"),
                                     (4,), batch_size=8, seed=3)
    mesh = parallel.make_mesh()
    reader = streams.StreamReader(split, 8, mesh, seed=3)
    clips, info = next(reader.batches(stream))
    clean = split.rows(info["id"])["video"]
    clips = np.asarray(clips)
    names = [stream.corruption_names[c] for c in info["corruption"]]
    assert set(names) == {"fog", "h264_crf"}
    for row, name in enumerate(names):
        if name == "h264_crf":
            expected = host_corruptions.corrupt(clean[row], name, 4, 3, info["id"][row])
        else:
            expected = corruptions.corrupt_clips(jnp.asarray(clean[row:row + 1]),
                                                 jnp.asarray(info["id"][row:row + 1]), name, 4,
                                                 3)[0]
        np.testing.assert_allclose(np.asarray(clips[row], np.int32),
                                   np.asarray(expected, np.int32), atol=1)
