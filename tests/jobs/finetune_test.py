"""Fine-tuning an exported or converted model: new head for the dataset's classes."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax import model_store, models
from dmd_jax.jobs import train

VIDEOMAE = dict(name="videomae", patch_size=8, tubelet_size=2, hidden_size=32, num_layers=1,
                num_heads=4, intermediate_size=64, qv_bias=True, use_mean_pooling=True,
                layer_norm_eps=1e-12)


def _pretrained_videomae(directory, num_classes=5):
    """A (random) VideoMAE exported like a converted checkpoint, for another label set."""
    config = ml_collections.ConfigDict(VIDEOMAE)
    module = models.build(config, num_classes)
    variables = module.init(jax.random.key(3), jnp.zeros((1, 8, 32, 32, 3)))
    model_store.save(directory, config, tuple(f"k{i}" for i in range(num_classes)),
                     variables, (8, 32, 32, 3), source="test")
    return model_store.load(directory)


def test_start_from_copies_all_but_the_new_head(tmp_path):
    pretrained = _pretrained_videomae(str(tmp_path / "pre"))
    module = models.build(pretrained.model_config, 12)
    tx = train.make_optimizer(tiny_config("").train)
    state = train.init_state(module, tx, (8, 32, 32, 3), seed=0)
    started, fresh = train.start_from(state, pretrained.variables)
    assert sorted(fresh) == ["['params']['classifier']['bias']", "['params']['classifier']['kernel']"]
    np.testing.assert_array_equal(started.params["layer0"]["attention"]["query"]["kernel"],
                                  pretrained.variables["params"]["layer0"]["attention"]["query"]["kernel"])
    np.testing.assert_array_equal(started.params["classifier"]["kernel"],
                                  state.params["classifier"]["kernel"])


def test_train_job_fine_tunes_a_converted_model(data_dir, tmp_path):
    _pretrained_videomae(str(tmp_path / "pre"))
    summary = train.run(tiny_config(data_dir, **{"train.init_from": str(tmp_path / "pre"),
                                                 "model": ml_collections.ConfigDict(),
                                                 "train.steps": 2, "train.eval_every": 100}),
                        str(tmp_path / "run"))
    assert summary["steps"] == 2 and np.isfinite(summary["eval_accuracy"])
    exported = model_store.load(str(tmp_path / "run" / "model"))
    assert exported.model_config.name == "videomae"  # the architecture came with the weights
    assert len(exported.class_names) == 12 and exported.class_names[0] == "move_right"
    info = json.load(open(os.path.join(tmp_path, "run", "model", "model.json")))
    assert info["shapes"]["['params']['classifier']['kernel']"] == [32, 12]


def test_a_model_field_that_contradicts_init_from_is_refused(data_dir, tmp_path):
    """init_from brings its architecture: config.model may repeat it, not change it (the
    demo's X3D block next to a VideoMAE checkpoint used to be ignored silently)."""
    _pretrained_videomae(str(tmp_path / "pre"))
    repeated = ml_collections.ConfigDict(dict(name="videomae", hidden_size=32))
    config = tiny_config(data_dir, **{"train.init_from": str(tmp_path / "pre"),
                                      "model": repeated, "train.steps": 1})
    with pytest.raises(train.ModelConflictError, match="hidden_size=64 .*has 32"):
        config.model.hidden_size = 64
        train.run(config, str(tmp_path / "run"))
    with pytest.raises(train.ModelConflictError, match="name='x3d'"):  # the demo's X3D block
        train.run(tiny_config(data_dir, **{"train.init_from": str(tmp_path / "pre")}),
                  str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()  # refused before writing anything
