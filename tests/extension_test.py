"""Extending dmd_jax without touching it: this file alone defines a new edge architecture,
a new router and a new test-time adaptation method, each by its documented protocol, and
the jobs run label -> train_switcher -> evaluate_hybrid and adapt with them.

The module itself is what the configs name (`model.name="extension_test"`, router
`"extension_test"`, method `"extension_test"`): a module on the Python path that exports
`Model`/`INPUT_STATS` (`dmd_jax.models`), `router` (`dmd_jax.routers`) and `Method`
(`dmd_jax.tta`).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import tiny_config
from dmd_jax import confidence, hybrid, routers
from dmd_jax.jobs import adapt, hybrid as hybrid_job, label, switcher, train
from dmd_jax.tta.base import GradientTTA

# ---------------------------------------------------------------------------------------
# A new edge architecture: a small 3D convolution stack with BatchNorm (the classifier
# protocol of dmd_jax.models).

INPUT_STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class Model(nn.Module):
    """Two strided 3x3x3 convolutions with BatchNorm, global pooling, a linear head."""

    num_classes: int
    width: int = 8
    dtype: jnp.dtype = jnp.float32  # a runtime setting it takes (config.runtime.dtype)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for i in range(2):
            x = nn.Conv(self.width * (i + 1), (3, 3, 3), strides=(1, 2, 2), dtype=self.dtype,
                        name=f"conv{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                                     name=f"norm{i}")(x))
        features = jnp.mean(x, axis=(1, 2, 3))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features)
        return logits.astype(jnp.float32), features.astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# A new router: the energy score (Liu et al. 2020), logsumexp of the logits; low energy
# margin means an unfamiliar clip, which goes to the cloud first.

def energy_score(params, features, logits):
    del params, features
    return jax.nn.logsumexp(logits, axis=-1)


def router(arg: str, context: routers.Context) -> routers.Router:
    routers.no_argument("extension_test", arg)
    return routers.Router("extension_test", energy_score)


# ---------------------------------------------------------------------------------------
# A new adaptation method: hard pseudo-labels (the TTA papers' "PL" baseline), SGD on the
# normalisation layers' affine parameters, only on clips predicted with confidence.

class Method(GradientTTA):
    SETTINGS = GradientTTA.SETTINGS + ("threshold",)

    def step(self, state, const, clips):
        def loss_fn(params):
            logits = self.logits(params, const, clips)
            confident = confidence.confidence_stats(logits)["max_prob"] >= self.cfg.threshold
            pseudo = jax.lax.stop_gradient(jnp.argmax(logits, -1))
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, pseudo)
            return jnp.sum(ce * confident) / jnp.maximum(jnp.sum(confident), 1), (logits,
                                                                                 confident)

        (loss, (logits, confident)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        return self.sgd(state, grads), logits, {"loss": loss, "learned_from": confident}


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extended(data_dir, tiny_pipeline, tmp_path_factory):
    """The new edge trained, then label, switcher and hybrid with the new router deployed,
    and adapt with the new method, the tiny pipeline's teacher as the cloud."""
    root = tmp_path_factory.mktemp("extension")
    model = ml_collections.ConfigDict(dict(name="extension_test", width=8))
    train.run(tiny_config(data_dir, **{"model": model, "train.steps": 4}), str(root / "edge"))
    models = {"edge.path": str(root / "edge" / "model"),
              "cloud.path": f"{tiny_pipeline}/teacher/model"}
    label.run(tiny_config(data_dir, "label", **models), str(root / "label"))
    switcher.run(tiny_config(data_dir, "switcher", **{"switcher.label_dir": str(root / "label")}),
                 str(root / "switcher"))
    hybrid_config = tiny_config(data_dir, "hybrid", **models, **{
        "hybrid.label_dir": str(root / "label"), "hybrid.switcher_dir": str(root / "switcher"),
        "hybrid.deploy": "energy"})
    hybrid_config.hybrid.routers.energy = "extension_test"
    hybrid_summary = hybrid_job.run(hybrid_config, str(root / "hybrid"))
    adapt_config = tiny_config(data_dir, "adapt", **models, **{
        "adapt.methods": ("norm", "pseudo_label"), "adapt.corruptions": ("gaussian_noise",)})
    adapt_config.adapt.variants.pseudo_label = dict(
        method="extension_test", learning_rate=0.05, momentum=0.9, threshold=0.0)
    adapt_summary = adapt.run(adapt_config, str(root / "adapt"))
    return root, hybrid_config, hybrid_summary, adapt_summary


def test_the_new_edge_trains_exports_and_labels(extended):
    root = extended[0]
    info = json.load(open(root / "edge" / "model" / "model.json"))
    assert info["model"] == {"name": "extension_test", "width": 8}
    assert "['params']['norm0']['scale']" in info["shapes"]
    summary = json.load(open(root / "label" / "summary.json"))
    assert summary["num_labelled"] == 32
    features = np.load(root / "label" / "unlabelled" / "chunk_00000000.npz")["edge_features"]
    assert features.shape == (16, 16)  # the new edge's pooled features: 2 x width


def test_the_new_router_is_compared_and_deployed(extended):
    root, config, summary, _ = extended
    assert "energy" in summary["routers"] and summary["deployed_router"] == "energy"
    point = json.load(open(root / "hybrid" / "operating_point.json"))
    assert point["router"] == "extension_test"
    scores = np.load(root / "hybrid" / "predictions.npz")["score_energy"]
    test = np.load(root / "label" / "test" / "chunk_00000000.npz")
    np.testing.assert_allclose(scores[:16], jax.nn.logsumexp(test["edge_logits"], -1), rtol=1e-5)
    # Deployable: the hybrid system runs the edge and the new router as one program.
    system = hybrid.HybridClassifier.from_dirs(
        str(root / "edge" / "model"), str(root / "switcher"), str(root / "hybrid" /
                                                                   "operating_point.json"),
        config.cloud.path, runtime=config.runtime)
    clips = np.random.default_rng(0).integers(0, 256, (6, 8, 32, 32, 3), dtype=np.uint8)
    result = system(clips)
    assert result.predictions.shape == (6,)
    np.testing.assert_array_equal(result.offloaded, result.router_scores < point["threshold"])


def test_the_new_method_adapts_in_the_adapt_job(extended):
    root, _, _, summary = extended
    assert set(summary["methods"]) == {"norm", "pseudo_label"}
    rows = np.load(root / "adapt" / "reset" / "pseudo_label" / "seed0" / "gaussian_noise@5.npz")
    assert rows["learned_from"].all()  # threshold 0: every clip is confident enough
    assert np.isfinite(rows["loss"]).all()
    assert summary["settings"]["pseudo_label"]["threshold"] == 0.0
    assert os.path.exists(root / "adapt" / "report.md")
