"""Models for the benchmarks: the demo's trained ones when `make demo` has run, else
random weights of the same architecture (speed and FLOPs do not depend on weights)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from configs import demo
from dmd_jax import model_store, models
from dmd_jax.data import synthetic
from dmd_jax.model_store import LoadedModel

DEMO_CLIP = (8, 32, 32, 3)
EDGE_DIR, CLOUD_DIR = "runs/demo/edge/model", "runs/demo/teacher/model"


RUNTIME = {"depthwise_impl": "shifted"}  # X3D's fastest on CPU (what "auto" picks there)


def random_model(config: dict, class_names: tuple[str, ...], clip: tuple[int, ...],
                 seed: int) -> LoadedModel:
    config = ml_collections.ConfigDict(config)
    module = models.build(config, len(class_names), RUNTIME)
    variables = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, *clip)))
    return LoadedModel(module, dict(variables), config, class_names, clip, "random")


def demo_or_random(path: str, arch: dict, seed: int) -> LoadedModel:
    """The model exported at `path`, or a random one of `arch` (source 'random')."""
    if os.path.exists(os.path.join(path, "model.json")):
        return model_store.load(path)
    return random_model(demo.model_config(arch).to_dict(), synthetic.CLASSES, DEMO_CLIP, seed)
