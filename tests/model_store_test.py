"""Exported models: the train job's export loads back and computes what training computed."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from dmd_jax import checkpoint, model_store
from dmd_jax.data import pipeline


@pytest.fixture(scope="module")
def trained(tiny_pipeline):
    """The workdir of a finished train job (the tiny pipeline's edge stage)."""
    return os.path.join(tiny_pipeline, "edge")


def test_export_reproduces_the_eval_logits(trained):
    model = model_store.load(os.path.join(trained, "model"), role="edge")
    assert model.input_shape == (8, 32, 32, 3) and len(model.class_names) == 12
    predictions = np.load(os.path.join(trained, "predictions.npz"))
    split = pipeline.Split(pipeline.make_builder(_data_config(trained)), "test", 8, 32)
    video = split.rows(np.arange(4))["video"]
    logits, features = jax.jit(model.logits_and_features)(model.variables, pipeline.normalize(video))
    np.testing.assert_allclose(logits, predictions["logits"][:4], rtol=1e-5, atol=1e-5)
    assert features.ndim == 2 and features.shape[0] == 4


def test_several_views_give_the_mean_of_each_views_outputs(trained):
    """`apply` on `(B, V, T, H, W, 3)`: the logits and features of the V views, averaged."""
    model = model_store.load(os.path.join(trained, "model"), role="edge")
    split = pipeline.Split(pipeline.make_builder(_data_config(trained)), "test", 8, 32)
    video = split.rows(np.arange(6))["video"].reshape(2, 3, 8, 32, 32, 3)  # 2 clips, 3 views
    logits, features = jax.jit(model.apply)(model.variables, video)
    each_logits, each_features = jax.jit(model.apply)(model.variables, video.reshape(6, 8, 32, 32, 3))
    np.testing.assert_allclose(logits, np.asarray(each_logits).reshape(2, 3, -1).mean(1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features, np.asarray(each_features).reshape(2, 3, -1).mean(1),
                               rtol=1e-5, atol=1e-6)


def _data_config(workdir):
    return ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json")))).data


def test_missing_model_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(model_store.ModelNotFoundError, match="cloud.*train job"):
        model_store.load(str(tmp_path), role="cloud")


def test_model_of_another_shape_is_refused(trained, tmp_path):
    info = json.load(open(os.path.join(trained, "model", "model.json")))
    info["model"]["head_dim"] = 64  # claims another head: shapes no longer match the files
    bad = tmp_path / "model"
    os.makedirs(bad)
    os.symlink(os.path.join(trained, "model", "variables"), bad / "variables")
    (bad / "model.json").write_text(json.dumps(info))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="head_post_conv"):
        model_store.load(str(bad))
