"""transformers `VideoMAEForVideoClassification` -> `models.videomae.VideoMAE`.

The architecture comes from the checkpoint's `config.json` (sizes, pooling, biases; every
field honoured or refused, see `hf_config`); the tensors of older checkpoints
(`q_bias`/`v_bias`) and of transformers 5 (`query.bias`) both map.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from dmd_jax.convert.hf_config import HFConfig
from dmd_jax.convert.mapping import ConversionError, Rule, conv, dense, layer_norm

_LAYER = r"layer(\d+)"
_SRC = r"videomae.encoder.layer.\1"
RULES: tuple[Rule, ...] = (
    Rule(r"params/patch_embed/kernel", "videomae.embeddings.patch_embeddings.projection.weight",
         conv),
    Rule(r"params/patch_embed/bias", "videomae.embeddings.patch_embeddings.projection.bias"),
    *dense(rf"{_LAYER}/attention/query", rf"{_SRC}.attention.attention.query", bias=False),
    Rule(rf"params/{_LAYER}/attention/query/bias",
         (rf"{_SRC}.attention.attention.query.bias", rf"{_SRC}.attention.attention.q_bias")),
    *dense(rf"{_LAYER}/attention/key", rf"{_SRC}.attention.attention.key", bias=False),
    *dense(rf"{_LAYER}/attention/value", rf"{_SRC}.attention.attention.value", bias=False),
    Rule(rf"params/{_LAYER}/attention/value/bias",
         (rf"{_SRC}.attention.attention.value.bias", rf"{_SRC}.attention.attention.v_bias")),
    *dense(rf"{_LAYER}/attention/out", rf"{_SRC}.attention.output.dense"),
    *dense(rf"{_LAYER}/intermediate", rf"{_SRC}.intermediate.dense"),
    *dense(rf"{_LAYER}/output", rf"{_SRC}.output.dense"),
    *layer_norm(rf"{_LAYER}/layernorm_before", rf"{_SRC}.layernorm_before"),
    *layer_norm(rf"{_LAYER}/layernorm_after", rf"{_SRC}.layernorm_after"),
    *layer_norm("fc_norm", "fc_norm"),
    *layer_norm("layernorm", "videomae.layernorm"),
    *dense("classifier", "classifier"),
)
IGNORE: tuple[str, ...] = ()
USES_CONFIG = True  # the architecture comes from config.json
# Fields of transformers' VideoMAEConfig that do not change a classifier's forward pass.
_TRAINING_ONLY = ("attention_probs_dropout_prob", "hidden_dropout_prob", "initializer_range",
                  "decoder_hidden_size", "decoder_intermediate_size", "decoder_num_attention_heads",
                  "decoder_num_hidden_layers", "norm_pix_loss", "drop_path_rate")


def model_config(state_dict: dict[str, np.ndarray],
                 hf: HFConfig | None) -> tuple[ml_collections.ConfigDict, int, tuple[int, int]]:
    """`(config.model, num_classes, (frames, size))` from the checkpoint's config.json;
    every field of it is honoured, known to be irrelevant, or refused by name."""
    if hf is None:
        raise ConversionError("a VideoMAE checkpoint needs its config.json next to the weights "
                              "(or pass the checkpoint folder as --src)")
    if "classifier.weight" not in state_dict:
        raise ConversionError("no classifier.weight: this is not a VideoMAEForVideoClassification "
                              "checkpoint (pre-training checkpoints have no classifier)")
    hf.choice("hidden_act", ("gelu",), "gelu")
    hf.choice("num_channels", (3,), 3)
    hf.ignore_if("use_learnable_pos_emb", False)  # original-repo configs; transformers' is fixed
    hf.ignore(*_TRAINING_ONLY)
    # Old checkpoints say qkv_bias (their key projection never had a bias either).
    qv_bias = hf.get("qv_bias", hf.get("qkv_bias", True))
    config = ml_collections.ConfigDict(dict(
        name="videomae", patch_size=int(hf.get("patch_size", 16)),
        tubelet_size=int(hf.get("tubelet_size", 2)),
        hidden_size=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        intermediate_size=int(hf.get("intermediate_size", 3072)),
        qv_bias=bool(qv_bias), use_mean_pooling=bool(hf.get("use_mean_pooling", True)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12))))
    shape = (int(hf.get("num_frames", 16)), square_size(hf, "image_size", 224))
    return config, int(state_dict["classifier.weight"].shape[0]), shape


def square_size(hf: HFConfig, key: str, default: int) -> int:
    """An `image_size` given as one int or as `[height, width]`: clips here are square."""
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{hf.name(key)}={list(value)}: only square frames are "
                                  "supported (dmd_jax's clips are size x size)")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{hf.name(key)}={value!r} must be a positive int or "
                              "[height, width]")
    return value
