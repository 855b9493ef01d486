"""PyTorch checkpoints -> the Flax models of dmd_jax (`python -m dmd_jax.convert`).

A *family* is a module of this package, found by the `--family` name (or any dotted
path), that exports its declarative key map (`RULES`, `IGNORE`), whether it reads the
checkpoint's `config.json` (`USES_CONFIG`), and `model_config(state_dict, hf)` ->
`(config.model, num_classes or None for zero-shot, (frames, size))`, where `hf` is the
config as an `hf_config.HFConfig` that refuses any field the family did not honour.
`mapping` applies the rules, `reader` loads the files without running code from them.
A zero-shot family's model module re-prompts it for the class names (`with_classes`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from etils import epath

from dmd_jax import files, model_store, models, plugins, text
from dmd_jax.convert import hf_config, mapping, reader

FAMILY_EXPORTS = ("RULES", "IGNORE", "USES_CONFIG", "model_config")


def family(name: str):
    """The converter module of `--family name`."""
    return plugins.resolve(name, __name__, "--family", FAMILY_EXPORTS)


def convert(family_name: str, src: str, out: str, frames: int | None = None,
            size: int | None = None,
            class_names: tuple[str, ...] | None = None) -> model_store.LoadedModel:
    """Converts the checkpoint at `src` and exports it to `out`; returns the loaded model.

    `frames`/`size` default to the checkpoint config's `num_frames`/`image_size` (X3D,
    which has none: 16 and 224): the clip shape the jobs will feed it.
    """
    rules = family(family_name)
    if epath.Path(out).exists() and not epath.Path(out).is_dir():
        raise mapping.ConversionError(f"--out {out!r} is a file, not a model directory: "
                                      "choose a directory path")
    weights, config_json = reader.find_checkpoint(src, rules.USES_CONFIG)
    state_dict = reader.read_state_dict(weights)
    hf = hf_config.HFConfig(config_json, family_name) if config_json is not None else None
    model_config, num_classes, (default_frames, default_size) = rules.model_config(state_dict, hf)
    stats = _input_stats(src)
    if stats:
        model_config.input_mean, model_config.input_std = stats
    size = size or default_size
    input_shape = (frames or default_frames, size, size, 3)
    if num_classes is None:  # zero-shot: the classes are the user's
        if not class_names:
            raise mapping.ConversionError(f"a zero-shot {family_name} classifier needs the "
                                          "class names: pass --class-names FILE (one per line)")
        num_classes = len(class_names)
    names = class_names or _names_from_config(hf, num_classes)
    if len(names) != num_classes:
        raise mapping.ConversionError(f"{len(names)} class names given, but the checkpoint "
                                      f"has {num_classes} classes")
    if hf is not None:
        hf.finish()  # every config.json field honoured or explicitly irrelevant

    module = models.build(model_config, num_classes)
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    variables = {k: v for k, v in target.items() if k != "text"}
    variables = mapping.convert(state_dict, variables, rules.RULES, rules.IGNORE)
    if "text" in target:  # zero-shot: its tokenizer is kept with it, to prompt new classes
        folder = src if os.path.isdir(src) else os.path.dirname(src)
        text.load_tokenizer(folder)  # one clear error if the checkpoint has none
        files.write_bytes(epath.Path(out) / text.TOKENIZER_FILE,
                          (epath.Path(folder) / text.TOKENIZER_FILE).read_bytes())
    source = f"converted from {src} ({family_name})"
    model = model_store.LoadedModel(module, variables, model_config, tuple(names), input_shape,
                                    source, out)
    if "text" in target:
        model = models.module_for(model_config.name).with_classes(model, tuple(names), out)
    model_store.save(out, model_config, tuple(names), model.variables, input_shape, source)
    return model_store.load(out)


def _input_stats(src: str) -> tuple | None:
    """The checkpoint's own normalisation (preprocessor_config.json), if it ships one;
    else the model module's `INPUT_STATS` apply."""
    folder = epath.Path(src if os.path.isdir(src) else os.path.dirname(src))
    path = folder / "preprocessor_config.json"
    if path.exists():
        processor = files.read_json(path)
        if "image_mean" in processor and "image_std" in processor:
            return tuple(processor["image_mean"]), tuple(processor["image_std"])
    return None


def _names_from_config(hf: hf_config.HFConfig | None, num_classes: int) -> tuple[str, ...]:
    id2label = hf.get("id2label") if hf is not None else None
    if id2label and len(id2label) == num_classes:
        return tuple(id2label[str(i)] if str(i) in id2label else id2label[i]
                     for i in range(num_classes))
    return tuple(f"class_{i}" for i in range(num_classes))
