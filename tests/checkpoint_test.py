"""Checkpoints: round trip, fallback past a damaged step, clear errors for the wrong model."""

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax import checkpoint


def _state(scale=1.0, shape=(3, 4)):
    return {"w": jnp.ones(shape) * scale, "b": jnp.arange(4.0) * scale}


def test_round_trip_with_meta(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
    ckpt.save(5, _state(2.0), {"data_seed": 3})
    ckpt.wait()
    state, meta = ckpt.restore_latest(_state())
    np.testing.assert_array_equal(state["w"], 2.0 * np.ones((3, 4)))
    assert meta["step"] == 5 and meta["data_seed"] == 3


def test_nothing_to_restore(tmp_path):
    assert checkpoint.Checkpointer(str(tmp_path / "c")).restore_latest(_state()) is None


def test_keeps_only_the_newest(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {})
    ckpt.wait()
    assert ckpt.steps() == [2, 3]


def _damage_latest(directory: str, step: int) -> None:
    """Truncates every data file of a step: a disk or copy that went wrong."""
    for root, _, files in os.walk(os.path.join(directory, str(step))):
        for name in files:
            if "state" in root:
                with open(os.path.join(root, name), "wb"):
                    pass


def _two_steps(directory: str) -> None:
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(1, _state(1.0), {})
    ckpt.save(2, _state(2.0), {})
    ckpt.wait()


def test_damaged_latest_step_falls_back_to_previous(tmp_path, caplog):
    directory = str(tmp_path / "c")
    _two_steps(directory)
    _damage_latest(directory, 2)
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoint.Checkpointer(directory)
        state, meta = ckpt.restore_latest(_state())
    assert meta["step"] == 1
    np.testing.assert_array_equal(state["b"], np.arange(4.0))
    assert "step 2" in caplog.text and "unreadable" in caplog.text and "aside" in caplog.text
    # Moved aside, not deleted; the step can be written again and the next resume is clean.
    (aside,) = os.listdir(directory + ".damaged")
    assert aside.startswith("2.") and ckpt.steps() == [1]
    ckpt.save(2, _state(3.0), {})
    ckpt.wait()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state, meta = checkpoint.Checkpointer(directory).restore_latest(_state())
    assert meta["step"] == 2 and "unreadable" not in caplog.text
    np.testing.assert_array_equal(state["b"], np.arange(4.0) * 3.0)


def test_unreadable_meta_falls_back_too(tmp_path, caplog):
    directory = str(tmp_path / "c")
    _two_steps(directory)
    for root, _, files in os.walk(os.path.join(directory, "2", "meta")):
        for name in files:
            with open(os.path.join(root, name), "w") as f:
                f.write("{not json")
    with caplog.at_level(logging.WARNING):
        _, meta = checkpoint.Checkpointer(directory).restore_latest(_state())
    assert meta["step"] == 1


def test_wrong_shapes_are_named_and_nothing_is_touched(tmp_path):
    directory = str(tmp_path / "c")
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(1, _state(), {})
    ckpt.wait()
    before = sorted(os.walk(directory))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"\['w'\].*\(3, 4\).*\(5, 4\)"):
        checkpoint.Checkpointer(directory).restore_latest(_state(shape=(5, 4)))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="missing"):
        checkpoint.Checkpointer(directory).restore_latest({"other": jnp.ones(2)})
    assert sorted(os.walk(directory)) == before
