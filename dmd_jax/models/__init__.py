"""Video classifiers, found by convention: `config.model.name` names a module.

**The classifier protocol.** A model is a module, `dmd_jax.models.<name>` or any importable
dotted path, that exports

- `Model`: a Flax Linen module class constructed as `Model(num_classes=C, **fields)`, where
  `fields` are the other entries of `config.model` (its architecture), plus any of the
  runtime settings in `RUNTIME_FIELDS` that the class declares (compute `dtype`,
  `depthwise_impl`, `attention_impl`), which the job's `config.runtime` supplies when the
  model is built or loaded;
- `INPUT_STATS`: `(mean, std)` per RGB channel of the inputs it was trained on (a model
  directory's `input_mean`/`input_std` override it, e.g. a checkpoint's own processor).

`Model.__call__(x, train=False)` takes normalised float clips `(B, T, H, W, 3)` and returns
float32 `(logits (B, C), features (B, D))`, the features being what the edge hands to a
router. `train=True` turns on dropout and normalises with batch statistics (updating the
`batch_stats` collection). Normalisation layers are Flax's own (`nn.BatchNorm`,
`nn.LayerNorm`, ...): test-time adaptation finds their `scale`/`bias` and, for BatchNorm,
switches them to test-batch statistics with a method interceptor (`dmd_jax.tta.renorm`),
so a model needs no adaptation-specific code.

Optionally, `with_classes(model, class_names, directory)`: a zero-shot model (X-CLIP)
re-targeted to new class names; models without it must be trained for the classes.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

import jax.numpy as jnp

import flax.linen as nn

from dmd_jax import plugins
from dmd_jax.errors import UserError

EXPORTS = ("Model", "INPUT_STATS")
# Settings of how a model runs, not of what it computes: they come from the job's config
# (`config.runtime`), never from a saved model's model.json.
RUNTIME_FIELDS = ("dtype", "depthwise_impl", "attention_impl")
# Keys of a model config that are not constructor fields.
_DESCRIPTIVE = ("name", "input_mean", "input_std")


class ModelConfigError(UserError, ValueError):
    """A model config names a field its architecture does not have."""


def module_for(name: str) -> types.ModuleType:
    """The module implementing `config.model.name`."""
    return plugins.resolve(name, __name__, "config.model.name", EXPORTS)


def input_stats(model: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the model's inputs are normalised with: the model
    config's `input_mean`/`input_std` when set, else its module's `INPUT_STATS`."""
    mean, std = module_for(model["name"]).INPUT_STATS
    return tuple(model.get("input_mean", mean)), tuple(model.get("input_std", std))


def architecture(model: Mapping[str, Any]) -> dict[str, Any]:
    """`config.model` without runtime settings: what defines the computation (model.json)."""
    return {k: v for k, v in dict(model).items() if k not in RUNTIME_FIELDS}


def build(model: Mapping[str, Any], num_classes: int,
          runtime: Mapping[str, Any] | None = None) -> nn.Module:
    """The classifier `model` (a `config.model`) describes, with `num_classes` outputs and
    the runtime settings of `runtime` (a `config.runtime`) that its class declares.

    A field the class lacks is an error naming it; runtime settings stored in an old
    model.json are replaced by `runtime`'s."""
    cls = module_for(model["name"]).Model
    declared = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    fields = {k: v for k, v in architecture(model).items() if k not in _DESCRIPTIVE}
    unknown = sorted(set(fields) - declared)
    if unknown:
        raise ModelConfigError(
            f"config.model.{unknown[0]} is not a field of {model['name']}.Model "
            f"({cls.__module__}); its fields are {sorted(declared - set(RUNTIME_FIELDS))}")
    for key, value in resolve_runtime(runtime or {}).items():
        if key in declared:
            fields[key] = value
    return cls(num_classes=num_classes, **fields)


def resolve_runtime(runtime: Mapping[str, Any]) -> dict[str, Any]:
    """`config.runtime` as constructor values: the compute dtype as a numpy dtype; 'auto'
    entries left out, so each model keeps its own default for them."""
    out = {}
    for key, value in dict(runtime).items():
        if key not in RUNTIME_FIELDS:
            raise ModelConfigError(f"config.runtime.{key} is not a runtime setting; they are "
                                   f"{list(RUNTIME_FIELDS)}")
        if value == "auto":
            continue
        out[key] = jnp.dtype(value) if key == "dtype" else value
    return out
