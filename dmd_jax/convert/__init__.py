"""PyTorch checkpoints -> the Flax models of dmd_jax (`python -m dmd_jax.convert`).

One module per model family holds its declarative key map (`RULES`, `IGNORE`) and reads
the model's configuration from the checkpoint (`model_config`); `mapping` applies the
rules, `reader` loads the files without running code from them. X-CLIP becomes a
zero-shot classifier: the class names' prompts are encoded once by its text tower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp

from dmd_jax import model_store, models, text
from dmd_jax.convert import mapping, reader
from dmd_jax.convert import videomae as videomae_family
from dmd_jax.convert import x3d as x3d_family
from dmd_jax.convert import xclip as xclip_family
from dmd_jax.models.xclip import XCLIP

FAMILIES: dict[str, types.ModuleType] = {
    "x3d": x3d_family, "videomae": videomae_family, "xclip": xclip_family}


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
    model_config.input_mean, model_config.input_std = _input_stats(src, rules.INPUT_STATS)
    vision = (hf_config or {}).get("vision_config", hf_config or {})
    input_shape = (frames or vision.get("num_frames", 16), size or vision.get("image_size", 224),
                   size or vision.get("image_size", 224), 3)
    if num_classes is None:  # zero-shot: the classes are the user's
        if not class_names:
            raise mapping.ConversionError(f"a zero-shot {family} classifier needs the class "
                                          "names: pass --class-names FILE (one per line)")
        num_classes = len(class_names)
    names = class_names or _names_from_config(hf_config, num_classes)
    if len(names) != num_classes:
        raise mapping.ConversionError(f"{len(names)} class names given, but the checkpoint "
                                      f"has {num_classes} classes")

    module = models.build(model_config, num_classes)
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    variables = {k: v for k, v in target.items() if k != "text"}
    variables = mapping.convert(state_dict, variables, rules.RULES, rules.IGNORE)
    if "text" in target:
        tokenizer_dir = src if os.path.isdir(src) else os.path.dirname(src)
        variables["text"] = {"embeds": class_text_embeddings(
            module.xclip, variables["params"]["xclip"], text.load_tokenizer(tokenizer_dir),
            names, model_config.prompt_template)}
    model_store.save(out, model_config, names, variables, input_shape,
                     source=f"converted from {src} ({family})")
    if "text" in target:  # kept with the model, so its classes can be changed later
        shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    return model_store.load(out)


def with_classes(model: model_store.LoadedModel, class_names: tuple[str, ...],
                 directory: str) -> model_store.LoadedModel:
    """A zero-shot model (X-CLIP) re-prompted for `class_names`, e.g. a dataset's classes.

    `directory` is the model directory `model` was loaded from (its tokenizer is there)."""
    if model.model_config.name != "xclip":
        raise mapping.ConversionError(
            f"only zero-shot models can take new class names; {model.source} is a "
            f"{model.model_config.name} classifier: fine-tune it (train.init_from) instead")
    xclip = model.module.xclip
    embeds = class_text_embeddings(xclip, model.variables["params"]["xclip"],
                                   text.load_tokenizer(directory), class_names,
                                   model.model_config.prompt_template)
    module = models.build(model.model_config, len(class_names))
    variables = {**model.variables, "text": {"embeds": embeds}}
    return dataclasses.replace(model, module=module, variables=variables, class_names=class_names)


def class_text_embeddings(xclip: XCLIP, params, tokenizer, class_names: tuple[str, ...],
                          template: str) -> jnp.ndarray:
    """The projected text embedding of each class's prompt, computed once."""
    ids = text.tokenize(tokenizer, text.prompts(class_names, template), xclip.context_length)
    return jax.jit(lambda p, i: xclip.apply({"params": p}, i, method=XCLIP.encode_text))(params, ids)


def _input_stats(src: str, default: tuple) -> tuple:
    """The checkpoint's own normalisation (preprocessor_config.json), else the family's."""
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            processor = json.load(f)
        if "image_mean" in processor and "image_std" in processor:
            return tuple(processor["image_mean"]), tuple(processor["image_std"])
    return default


def _names_from_config(hf_config: dict | None, num_classes: int) -> tuple[str, ...]:
    id2label = (hf_config or {}).get("id2label")
    if id2label and len(id2label) == num_classes:
        return tuple(id2label[str(i)] if str(i) in id2label else id2label[i]
                     for i in range(num_classes))
    return tuple(f"class_{i}" for i in range(num_classes))
