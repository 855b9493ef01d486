"""transformers `VideoMAEForVideoClassification` -> `models.videomae.VideoMAE`.

The architecture comes from the checkpoint's `config.json` (sizes, pooling, biases); the
tensors of older checkpoints (`q_bias`/`v_bias`) and of transformers 5 (`query.bias`)
both map.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

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
INPUT_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet, its processor's default


def model_config(state_dict: dict[str, np.ndarray],
                 hf_config: dict[str, Any] | None) -> tuple[ml_collections.ConfigDict, int]:
    """`(config.model, num_classes)` from the checkpoint's config.json."""
    if not hf_config:
        raise ConversionError("a VideoMAE checkpoint needs its config.json next to the weights "
                              "(or pass the checkpoint folder as --src)")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act {hf_config['hidden_act']!r} is not supported (gelu only)")
    if "classifier.weight" not in state_dict:
        raise ConversionError("no classifier.weight: this is not a VideoMAEForVideoClassification "
                              "checkpoint (pre-training checkpoints have no classifier)")
    get = lambda key, default: hf_config.get(key, default)
    config = ml_collections.ConfigDict(dict(
        name="videomae", patch_size=get("patch_size", 16), tubelet_size=get("tubelet_size", 2),
        hidden_size=get("hidden_size", 768), num_layers=get("num_hidden_layers", 12),
        num_heads=get("num_attention_heads", 12),
        intermediate_size=get("intermediate_size", 3072),
        qv_bias=bool(hf_config.get("qv_bias", hf_config.get("qkv_bias", True))),
        use_mean_pooling=bool(get("use_mean_pooling", True)),
        layer_norm_eps=float(get("layer_norm_eps", 1e-12)), dtype="float32"))
    return config, int(state_dict["classifier.weight"].shape[0])
