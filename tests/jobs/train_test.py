"""The train job: outputs, sharding invariance, resume, and its errors on bad input."""

import functools
import re
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax import checkpoint, files, models, parallel, stamps
from dmd_jax.data import loader, pipeline
from dmd_jax.jobs import train


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("train"))
    return workdir, train.run(tiny_config(data_dir), workdir)


def test_summary_and_files(finished_run):
    workdir, summary = finished_run
    for key in ("eval_accuracy", "steps", "examples_per_sec", "param_fingerprint"):
        assert key in summary
    assert summary["steps"] == 6 and summary["examples_per_sec"] > 0
    assert json.load(open(os.path.join(workdir, "summary.json"))) == json.loads(
        json.dumps(summary))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert "stem" in open(os.path.join(workdir, "parameters.txt")).read()
    assert json.load(open(os.path.join(workdir, "config.json")))["job"] == "train"
    predictions = np.load(os.path.join(workdir, "predictions.npz"))
    np.testing.assert_array_equal(predictions["id"], np.arange(32))  # every test clip, in order
    accuracy = np.mean(predictions["logits"].argmax(-1) == predictions["label"])
    assert accuracy == pytest.approx(summary["eval_accuracy"])
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).steps()[-1] == 6


def test_rerun_of_a_finished_job_changes_nothing(finished_run, data_dir):
    workdir, summary = finished_run
    again = train.run(tiny_config(data_dir), workdir)
    assert again["param_fingerprint"] == summary["param_fingerprint"]
    assert again["eval_accuracy"] == summary["eval_accuracy"]
    assert again["examples_per_sec"] == summary["examples_per_sec"] > 0  # not clobbered


def _loss_trajectory(config, mesh, steps: int) -> list[float]:
    """The job's own pieces (state init, jitted step, host->global batches) on `mesh`."""
    split = pipeline.Split(pipeline.make_builder(config.data), "train", 8, 32)
    model = models.build(config.model, split.num_classes, config.runtime)  # lax depthwise
    tx = train.make_optimizer(config.train)
    repl = parallel.replicated(mesh)
    state = jax.jit(functools.partial(train.init_state, model, tx, (8, 32, 32, 3), 0),
                    out_shardings=repl)()
    step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                        label_smoothing=0.0, seed=0),
                      in_shardings=(repl, parallel.batch_sharded(mesh)),
                      out_shardings=(repl, repl))
    batches = loader.train_batches(split, config.train.batch_size, 0, steps, 0, slice(None))
    losses = []
    for _ in range(steps):
        state, metrics = step_fn(state, parallel.to_global(next(batches), mesh))
        losses.append(float(metrics.compute()["loss"]))
    return losses


def test_same_loss_trajectory_on_1_and_8_devices(data_dir, devices):
    config = tiny_config(data_dir, **{"train.steps": 12, "train.learning_rate": 1e-3})
    one = _loss_trajectory(config, parallel.make_mesh(1), 12)
    eight = _loss_trajectory(config, parallel.make_mesh(8), 12)
    assert len(set(one)) > 10  # the loss moves: the comparison is not vacuous
    # The meshes sum in different orders (~4e-7 apart from step 3 on) and training on
    # 8-clip batches amplifies that (BatchNorm over channels nearly constant across the
    # batch, e.g. on the uniform floor; ~10x per step from step 5 here: 1.6e-5 at step 5,
    # 6e-5 at step 6): the first four steps must agree to float precision, the rest only
    # stay the same trajectory.
    np.testing.assert_allclose(eight[:4], one[:4], rtol=1e-6)
    np.testing.assert_allclose(eight, one, rtol=1e-2)


def _tree_files(directory):
    return {os.path.join(r, f): os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(directory) for f in fs}


def test_checkpoint_of_another_model_is_refused_untouched(finished_run, data_dir):
    workdir, _ = finished_run
    before = _tree_files(workdir)
    wider_head = tiny_config(data_dir, **{"model.head_dim": 48})
    with pytest.raises(stamps.StaleArtifactError, match=r"settings.model.head_dim: 32 -> 48"):
        train.run(wider_head, workdir)
    assert _tree_files(workdir) == before  # config.json included: nothing written


@pytest.mark.parametrize("override,named", [
    ({"train.batch_size": 16}, "settings.train.batch_size: 8 -> 16"),
    ({"train.steps": 3}, "settings.train.steps: 6 -> 3"),  # fewer steps than on disk
    ({"seed": 1}, "settings.seed: 0 -> 1"),
    ({"runtime.dtype": "bfloat16"}, "settings.runtime.dtype"),
    ({"data.split_specs": {"train": "train[:50%]"}}, "settings.data.split_specs.train"),
])
def test_a_rerun_with_other_settings_is_refused_untouched(finished_run, data_dir, override,
                                                         named):
    workdir, _ = finished_run
    before = _tree_files(workdir)
    with pytest.raises(stamps.StaleArtifactError, match=re.escape(named) + ".*overwrite=True"):
        train.run(tiny_config(data_dir, **override), workdir)
    assert _tree_files(workdir) == before


def test_overwrite_recomputes_what_other_settings_made(finished_run, data_dir, tmp_path):
    import shutil

    workdir, first = finished_run
    stale = tmp_path / "stale"
    shutil.copytree(workdir, stale)  # another run's results (6 steps at the default rate)
    config = tiny_config(data_dir, **{"train.steps": 2, "train.eval_every": 100,
                                      "train.learning_rate": 1e-4, "overwrite": True})
    again = train.run(config, str(stale))
    assert again["param_fingerprint"] != first["param_fingerprint"] and again["steps"] == 2
    fresh = train.run(config, str(tmp_path / "fresh"))  # the same as never having the old
    assert again["param_fingerprint"] == fresh["param_fingerprint"]


def test_non_finite_loss_stops_before_saving(data_dir, tmp_path):
    # Warm-up from 0: step 1 changes nothing (and is checkpointed), step 2 diverges.
    config = tiny_config(data_dir, **{"train.optimizer": "sgd", "train.learning_rate": 1e30,
                                      "train.steps": 9, "train.checkpoint_every": 1,
                                      "train.log_every": 1, "train.warmup_steps": 3})
    with pytest.raises(train.NonFiniteLossError, match="learning_rate") as err:
        train.run(config, str(tmp_path))
    failed_at = int(str(err.value).split("by step ")[1].split(" ")[0])
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    saved = ckpt.steps()
    assert all(step < failed_at for step in saved)  # nothing diverged was checkpointed
    assert not os.path.exists(tmp_path / "summary.json")
    assert saved  # the warm-up's first finite steps were kept
    if saved:  # what the error calls finite is: every parameter of the kept state
        assert f"step {saved[-1]}, holds a finite state" in str(err.value)
        state, _ = ckpt.restore_latest(_initial_state(config))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def _initial_state(config):
    """A train state shaped like the job's, for restoring its checkpoints."""
    model = models.build(config.model, 12, config.runtime)
    tx = train.make_optimizer(config.train)
    return train.init_state(model, tx, (8, 32, 32, 3), 0)


def test_unwritable_workdir_is_a_clear_error(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(files.WorkdirError, match="--workdir"):
        train.run(tiny_config(data_dir), str(blocker / "run"))
    assert blocker.read_text() == "a file, not a folder"


def test_learning_rate_schedules():
    import ml_collections
    base = dict(learning_rate=1.0, warmup_steps=10, steps=100, decay_fraction=0.2)
    wsd = train.make_schedule(ml_collections.ConfigDict(dict(base, schedule="wsd")))
    cosine = train.make_schedule(ml_collections.ConfigDict(dict(base, schedule="cosine")))
    # Both warm up linearly from 0 to the peak.
    for schedule in (wsd, cosine):
        np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0])
    # 'wsd' holds the peak until the last 20 steps, then decays to 0; cosine decays from 10.
    np.testing.assert_allclose([wsd(50), wsd(79), wsd(80)], 1.0)
    assert 0.0 < wsd(90) < 1.0 and cosine(50) < 1.0
    np.testing.assert_allclose([wsd(100), cosine(100)], 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="schedule"):
        train.make_schedule(ml_collections.ConfigDict(dict(base, schedule="linear")))
