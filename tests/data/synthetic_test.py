"""The procedural dataset: deterministic, varied, and some classes separable only by order."""

import dataclasses

import numpy as np
import pytest

from dmd_jax.data import synthetic

CFG = synthetic.RenderConfig(frames=8, height=32, width=32)
# Nothing but the actor: clutter, distractors, occlusion, drift and noise all off.
CLEAN = dataclasses.replace(CFG, max_distractors=0, max_clutter=0, max_noise=0.0,
                            occlusion_prob=0.0, max_drift=0.0)


def _render(label, cfg=CFG, index=0, seed=0, split="train"):
    return synthetic.render_clip(synthetic.clip_rng(seed, split, index), label, cfg)[0]


def test_clip_shape_and_dtype():
    clip = _render(0, dataclasses.replace(CFG, frames=6, height=24, width=40))
    assert clip.shape == (6, 24, 40, 3) and clip.dtype == np.uint8


def test_deterministic_per_clip_and_independent_of_chunking():
    whole = list(synthetic.generate(3, "test", 6, CFG))
    again = list(synthetic.generate(3, "test", 6, CFG))
    for (_, a, la, *_), (_, b, lb, *_) in zip(whole, again):
        np.testing.assert_array_equal(a, b)
        assert la == lb
    # Clip 4 rendered on its own equals clip 4 of the sequence.
    np.testing.assert_array_equal(synthetic.render_example(3, "test", 4, CFG)[0], whole[4][1])


def test_seeds_and_splits_give_different_clips():
    a = _render(0, seed=0)
    assert not np.array_equal(a, _render(0, seed=1))
    assert not np.array_equal(a, _render(0, split="test"))


@pytest.mark.parametrize("label", range(len(synthetic.CLASSES)))
def test_every_class_moves(label):
    clip = _render(label, CLEAN, index=label).astype(np.float32)
    assert np.abs(np.diff(clip, axis=0)).mean() > 0.5  # something changes over time


@pytest.mark.parametrize("a,b", [("move_right", "move_left"), ("move_up", "move_down"),
                                 ("grow", "shrink"), ("rotate_cw", "rotate_ccw")])
def test_twin_classes_differ_only_in_frame_order(a, b):
    """Same actor, same scene: one class is the other played backwards."""
    for index in range(3):
        clip_a = _render(synthetic.CLASSES.index(a), CLEAN, index)
        clip_b = _render(synthetic.CLASSES.index(b), CLEAN, index)
        np.testing.assert_array_equal(clip_a[::-1], clip_b)
        # So a model averaging over frames sees identical inputs.
        np.testing.assert_array_equal(clip_a.mean(0), clip_b.mean(0))


def test_difficulty_varies_and_drives_clutter():
    clips = list(synthetic.generate(0, "train", 60, CFG))
    difficulty = np.array([d for _, _, _, d, _ in clips])
    assert difficulty.min() < 0.2 and difficulty.max() > 0.8
    # Noise and clutter grow with difficulty: high-frequency energy correlates with it.
    energy = np.array([np.abs(np.diff(c.astype(np.float32), axis=2)).mean()
                       for _, c, *_ in clips])
    assert np.corrcoef(difficulty, energy)[0, 1] > 0.5


def test_labels_cover_every_class():
    labels = {label for _, _, label, *_ in synthetic.generate(0, "train", 200, CFG)}
    assert labels == set(range(len(synthetic.CLASSES)))


def test_rotation_is_a_turn_about_a_pivot():
    """The actor travels a curved path: its motion direction turns over the clip."""
    clip = _render(synthetic.CLASSES.index("rotate_cw"), CLEAN, index=1).astype(np.float32)
    changed = np.abs(np.diff(clip, axis=0)).sum(-1) > 30  # pixels that changed, per step
    ys, xs = np.mgrid[0:32, 0:32]
    centres = np.array([(xs[m].mean(), ys[m].mean()) for m in changed])
    steps = np.diff(centres, axis=0)
    # Screen y points down: clockwise means a positive cross product of successive steps.
    cross = steps[:-1, 0] * steps[1:, 1] - steps[:-1, 1] * steps[1:, 0]
    assert np.mean(cross > 0) > 0.7


def test_drawing_only_where_sprites_reach_changes_no_pixel(monkeypatch):
    """`_draw` computes only the window `_reach` bounds; every pixel must be what drawing
    the whole frame gives (sprites near the edges, every shape, every difficulty)."""
    windowed = [clip for _, clip, *_ in synthetic.generate(5, "train", 60, CFG)]
    monkeypatch.setattr(synthetic, "_reach", lambda sprite, size, height, width:
                        (slice(0, height), slice(0, width)))
    whole = [clip for _, clip, *_ in synthetic.generate(5, "train", 60, CFG)]
    for a, b in zip(windowed, whole):
        np.testing.assert_array_equal(a, b)


def test_the_floor_shows_which_way_is_up():
    """Upright, the bottom rows (the floor) are darker than the top (the sky) in every clip;
    from a ceiling camera, the other way round: a model can tell, so it can learn the
    world's labels."""
    for _, clip, _, _, ceiling in synthetic.generate(0, "test", 40, CFG, 0.5):
        frame = clip.astype(np.float32).mean(axis=(0, 3))
        top, bottom = frame[:3].mean(), frame[-3:].mean()
        assert (top < bottom) == ceiling


def test_ceiling_cameras_turn_the_same_clip_and_flicker():
    upright = list(synthetic.generate(2, "unlabelled", 50, CFG, 0.0))
    mixed = list(synthetic.generate(2, "unlabelled", 50, CFG, 0.3))
    assert 5 <= sum(m[4] for m in mixed) <= 25 and not any(u[4] for u in upright)
    for (i, a, la, da, _), (_, b, lb, db, ceiling) in zip(upright, mixed):
        assert (la, da) == (lb, db)  # same scene, same label: the world's, not the screen's
        if not ceiling:
            np.testing.assert_array_equal(a, b)
            continue
        rng = synthetic.clip_rng(2, "unlabelled", i)  # replay the draws up to the flicker
        rng.integers(len(synthetic.CLASSES)), rng.uniform(), synthetic.render_clip(rng, la, CFG)
        gains = synthetic.flicker_gains(rng, CFG.frames)
        np.testing.assert_array_equal(b, synthetic.ceiling_view(a, gains))
        # Turned half a circle, brightness alternating 14-30% up and down.
        assert np.all(np.abs(gains - 1) >= 0.14) and np.all(np.abs(gains - 1) <= 0.3)
        assert np.all(np.sign(gains[:-1] - 1) != np.sign(gains[1:] - 1))
    np.testing.assert_array_equal(synthetic.ceiling_view(a, np.ones(CFG.frames)), a[:, ::-1, ::-1])
    assert all(c for *_, c in synthetic.generate(2, "broad", 10, CFG, 1.0))
