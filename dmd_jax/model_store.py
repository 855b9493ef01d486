"""Trained or converted models on disk: one format that every job loads.

A model directory holds `model.json` (the `config.model` it was built from, its classes
and where it came from) and `variables/` (an orbax checkpoint of `params` and
`batch_stats`). The `train` job exports one at its end and the converters write the same
thing, so a teacher trained here and a teacher converted from PyTorch load through
exactly one path. `model.json` is written last: a directory without it is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dmd_jax import checkpoint, models, parallel, reporting
from dmd_jax.data import pipeline
from dmd_jax.errors import UserError


class ModelNotFoundError(UserError, FileNotFoundError):
    """The configured model directory does not hold a complete exported model."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A Flax module with its variables, ready for `module.apply(variables, x)`."""

    module: nn.Module
    variables: dict[str, Any]
    model_config: ml_collections.ConfigDict
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # one clip: (frames, height, width, 3)
    source: str

    def logits_and_features(self, video: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Inference on normalised clips: `(logits, pooled features)`."""
        return self.module.apply(self.variables, video, train=False)

    def classify(self, clips: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Inference on uint8 clips of any length and size: resampled to this model's
        `input_shape` (a no-op when they match), normalised with its own statistics."""
        frames, size = self.input_shape[0], self.input_shape[1]
        clips = pipeline.resample(clips, frames, size)
        return self.logits_and_features(
            pipeline.normalize(clips, *models.input_stats(self.model_config)))


def save(directory: str, model_config: ml_collections.ConfigDict, class_names: tuple[str, ...],
         variables: dict[str, Any], input_shape: tuple[int, ...], source: str) -> None:
    """Writes `variables` and `model.json` to `directory` (replacing a previous export)."""
    directory = os.path.abspath(directory)
    variables = {k: v for k, v in variables.items() if jax.tree.leaves(v)}  # no empty collections
    info_path = os.path.join(directory, "model.json")
    target = os.path.join(directory, "variables")
    if parallel.is_main_process():
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(info_path):
            os.remove(info_path)  # incomplete until the new variables are on disk
        if os.path.exists(target):
            shutil.rmtree(target)
    checkpoint.save_tree(target, variables)
    reporting.write_json(info_path, {
        "model": model_config.to_dict(), "class_names": list(class_names), "source": source,
        "input_shape": list(input_shape), "shapes": checkpoint.shapes(variables)})


def load(directory: str, role: str = "model") -> LoadedModel:
    """Loads the model exported to `directory`; `role` names it in errors (e.g. 'cloud')."""
    info_path = os.path.join(directory, "model.json")
    if not os.path.exists(info_path):
        raise ModelNotFoundError(
            f"no exported model in {directory!r} for the {role} (model.json missing): train "
            "one with the train job (it exports to WORKDIR/model) or convert one with "
            "`python -m dmd_jax.convert`, then point the config at that directory")
    with open(info_path) as f:
        info = json.load(f)
    model_config = ml_collections.ConfigDict(info["model"])
    class_names = tuple(info["class_names"])
    module = models.build(model_config, len(class_names))
    expected = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *info["input_shape"]))))
    checkpoint.check_compatible(info["shapes"], dict(expected), directory)
    variables = checkpoint.restore_everywhere(os.path.join(directory, "variables"),
                                              dict(expected))
    return LoadedModel(module, dict(variables), model_config, class_names,
                       tuple(info["input_shape"]), info["source"])

