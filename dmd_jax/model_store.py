"""Trained or converted models on disk: one format that every job loads.

A model directory holds `model.json` (the architecture it was built from, its classes,
input shape, fingerprint and where it came from) and `variables/` (an orbax checkpoint of
`params` and `batch_stats`). The `train` job exports one at its end and the converters
write the same thing, so a teacher trained here and a teacher converted from PyTorch load
through exactly one path. `model.json` is written last: a directory without it is
incomplete. How a model *runs* (compute dtype, convolution and attention implementations)
is not part of it: the job that loads it says so (`config.runtime`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from dmd_jax import checkpoint, files, models, reporting
from dmd_jax.data import pipeline, views
from dmd_jax.errors import UserError

INFO_FILE = "model.json"


class ModelNotFoundError(UserError, FileNotFoundError):
    """The configured model directory does not hold a complete exported model."""


class CorruptModelError(UserError, ValueError):
    """A model directory whose files cannot be read as the model its model.json describes."""


class ClassMismatchError(UserError, ValueError):
    """A model predicts other classes than the dataset it is used on."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A Flax module with its variables.

    The forward functions take the variables as an argument (`model.apply(model.variables,
    clips)` under `jax.jit`), so compiled programs never carry weights as constants."""

    module: nn.Module
    variables: dict[str, Any]
    model_config: ml_collections.ConfigDict  # the architecture (model.json's "model")
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # one clip: (frames, height, width, 3)
    source: str
    directory: str = ""

    def logits_and_features(self, variables: Mapping[str, Any],
                            x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Inference on normalised clips: `(logits, pooled features)`."""
        return self.module.apply(variables, x, train=False)

    def apply(self, variables: Mapping[str, Any],
              clips: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Inference on uint8 clips of any length and size: resampled to this model's
        `input_shape` (a no-op when they match), normalised with its own statistics.
        Clips with several evaluation views `(B, V, T, H, W, 3)` give the views' mean."""
        return views.average_over_views(
            lambda video: self.logits_and_features(variables, self.prepare(video)), clips)

    def prepare(self, clips: jnp.ndarray) -> jnp.ndarray:
        """uint8 clips -> this model's normalised input."""
        frames, size = self.input_shape[0], self.input_shape[1]
        clips = pipeline.resample(clips, frames, size)
        return pipeline.normalize(clips, *models.input_stats(self.model_config))

    @functools.cached_property
    def fingerprint(self) -> str:
        """Of the variables (and the class prompts of a zero-shot model): equal iff
        bit-identical, what artifact stamps record as this model's identity."""
        return reporting.fingerprint(self.variables)


def save(directory: str, model_config: Mapping[str, Any], class_names: tuple[str, ...],
         variables: dict[str, Any], input_shape: tuple[int, ...], source: str) -> None:
    """Writes `variables` and `model.json` to `directory` (replacing a previous export)."""
    target = epath.Path(directory)
    variables = {k: v for k, v in variables.items() if jax.tree.leaves(v)}  # no empty collections
    files.remove(target / INFO_FILE)  # incomplete until the new variables are on disk
    files.remove_tree(target / "variables")
    checkpoint.save_tree(str(target / "variables"), variables)
    files.write_json(target / INFO_FILE, {
        "model": models.architecture(dict(model_config)), "class_names": list(class_names),
        "source": source, "input_shape": list(input_shape),
        "shapes": checkpoint.shapes(variables), "fingerprint": reporting.fingerprint(variables)})


def require(directory: str, role: str = "model") -> epath.Path:
    """The path of `directory`'s model.json, or the one clear error when there is none:
    jobs call it before slow work (preparing a dataset) to fail fast."""
    info_path = epath.Path(directory) / INFO_FILE
    if not info_path.exists():
        raise ModelNotFoundError(
            f"no exported model in {directory!r} for the {role} ({INFO_FILE} missing): train "
            "one with the train job (it exports to WORKDIR/model) or convert one with "
            "`python -m dmd_jax.convert`, then point the config at that directory")
    return info_path


def load(directory: str, role: str = "model", runtime: Mapping[str, Any] | None = None,
         class_names: tuple[str, ...] | None = None) -> LoadedModel:
    """Loads the model exported to `directory`, built with the job's `runtime` settings.

    `role` names it in errors (e.g. 'cloud'). With `class_names` (a dataset's), the model
    must predict exactly those, or be a zero-shot model whose module re-targets it
    (`with_classes`, X-CLIP)."""
    info_path = require(directory, role)
    info = files.read_json(info_path)
    missing = [k for k in ("model", "class_names", "input_shape", "shapes") if k not in info]
    if missing:
        raise CorruptModelError(f"{info_path} lacks {missing}: it was not written by dmd_jax or "
                                "is damaged; export or convert the model again")
    model_config = ml_collections.ConfigDict(models.architecture(info["model"]))
    names = tuple(info["class_names"])
    module = models.build(model_config, len(names), runtime)
    expected = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *info["input_shape"]))))
    checkpoint.check_compatible(info["shapes"], dict(expected), directory)
    try:
        variables = checkpoint.restore_everywhere(str(epath.Path(directory) / "variables"),
                                                  dict(expected))
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CorruptModelError(
            f"the variables of model directory {directory!r} ({role}) cannot be read as the "
            f"{model_config.name} its model.json describes ({type(err).__name__}: {first}); "
            "the directory is incomplete, damaged or mixed with another model's files: export "
            "or convert the model again") from err
    model = LoadedModel(module, dict(variables), model_config, names,
                        tuple(info["input_shape"]), info["source"], str(directory))
    if class_names is not None and tuple(class_names) != names:
        model = _for_classes(model, tuple(class_names), role)
    return model


def _for_classes(model: LoadedModel, class_names: tuple[str, ...], role: str) -> LoadedModel:
    module = models.module_for(model.model_config.name)
    if hasattr(module, "with_classes"):
        reporting.log(f"[{role}] zero-shot model {model.source}: prompting it with the "
                      f"dataset's {len(class_names)} class names")
        return module.with_classes(model, class_names, model.directory)
    raise ClassMismatchError(
        f"the {role} model ({model.source}) predicts classes {list(model.class_names[:4])}... "
        f"but the dataset has {list(class_names[:4])}...; train or convert the {role} for "
        "this dataset's classes")



def stored_fingerprint(directory: str) -> str:
    """A model directory's fingerprint as `save` recorded it, without loading the model
    (loading it instead for exports that predate the record)."""
    info_path = epath.Path(directory) / INFO_FILE
    if info_path.exists():
        recorded = files.read_json(info_path).get("fingerprint")
        if recorded:
            return recorded
    return load(directory).fingerprint
