"""PyTorch checkpoints -> the Flax models of dmd_jax (`python -m dmd_jax.convert`).

One module per model family holds its declarative key map (`RULES`, `IGNORE`) and reads
the model's configuration from the checkpoint (`model_config`); `mapping` applies the
rules, `reader` loads the files without running code from them.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from dmd_jax import model_store, models
from dmd_jax.convert import mapping, reader
from dmd_jax.convert import videomae as videomae_family
from dmd_jax.convert import x3d as x3d_family

FAMILIES: dict[str, types.ModuleType] = {"x3d": x3d_family, "videomae": videomae_family}


def convert(family: str, src: str, out: str, frames: int | None = None, size: int | None = None,
            class_names: tuple[str, ...] | None = None) -> model_store.LoadedModel:
    """Converts the checkpoint at `src` and exports it to `out`; returns the loaded model.

    `frames`/`size` default to the checkpoint config's `num_frames`/`image_size` (else 16
    and 224): the clip shape the jobs will feed it.
    """
    if family not in FAMILIES:
        raise reader.CheckpointFormatError(f"unknown --family {family!r}; choose from "
                                           f"{sorted(FAMILIES)}")
    rules = FAMILIES[family]
    weights, hf_config = reader.find_checkpoint(src)
    state_dict = reader.read_state_dict(weights)
    model_config, num_classes = rules.model_config(state_dict, hf_config)
    module = models.build(model_config, num_classes)
    frames = frames or (hf_config or {}).get("num_frames", 16)
    size = size or (hf_config or {}).get("image_size", 224)
    input_shape = (frames, size, size, 3)
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    variables = mapping.convert(state_dict, dict(target), rules.RULES, rules.IGNORE)
    names = class_names or _names_from_config(hf_config, num_classes)
    if len(names) != num_classes:
        raise mapping.ConversionError(f"{len(names)} class names given, but the checkpoint "
                                      f"has {num_classes} classes")
    model_store.save(out, model_config, names, variables, input_shape,
                     source=f"converted from {src} ({family})")
    return model_store.load(out)


def _names_from_config(hf_config: dict | None, num_classes: int) -> tuple[str, ...]:
    id2label = (hf_config or {}).get("id2label")
    if id2label and len(id2label) == num_classes:
        return tuple(id2label[str(i)] if str(i) in id2label else id2label[i]
                     for i in range(num_classes))
    return tuple(f"class_{i}" for i in range(num_classes))
