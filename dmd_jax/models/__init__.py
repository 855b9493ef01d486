"""Flax Linen models. `build` turns a `config.model` into a module."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

import flax.linen as nn

from dmd_jax.models.videomae import VideoMAE
from dmd_jax.models.x3d import X3D
from dmd_jax.models.xclip import XCLIP, XCLIPZeroShot


def input_stats(model: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the model's inputs are normalised with (`input_mean`,
    `input_std` in its config; Kinetics statistics, X3D's, when absent)."""
    from dmd_jax.data import pipeline

    return (tuple(model.get("input_mean", pipeline.MEAN)),
            tuple(model.get("input_std", pipeline.STD)))


def build(model: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The classifier `config.model` describes, with `num_classes` outputs.

    Every classifier maps normalised clips `(B, T, H, W, 3)` to `(logits, features)`.
    """
    if model.name == "videomae":
        return VideoMAE(
            num_classes=num_classes, patch_size=model.patch_size,
            tubelet_size=model.tubelet_size, hidden_size=model.hidden_size,
            num_layers=model.num_layers, num_heads=model.num_heads,
            intermediate_size=model.intermediate_size, qv_bias=model.qv_bias,
            use_mean_pooling=model.use_mean_pooling, layer_norm_eps=model.layer_norm_eps,
            dtype=jnp.dtype(model.dtype))
    if model.name == "xclip":
        fields = {k: model[k] for k in XCLIP.__dataclass_fields__ if k in model
                  and k not in ("parent", "name", "dtype")}
        return XCLIPZeroShot(num_classes, XCLIP(**fields, dtype=jnp.dtype(model.dtype)))
    if model.name != "x3d":
        raise ValueError(f"unknown config.model.name {model.name!r}; available: 'x3d', "
                         "'videomae', 'xclip'")
    return X3D(
        num_classes=num_classes,
        width_factor=model.width_factor,
        depth_factor=model.depth_factor,
        stem_dim_in=model.stem_dim_in,
        bottleneck_factor=model.bottleneck_factor,
        se_ratio=model.se_ratio,
        head_dim=model.head_dim,
        dropout_rate=model.dropout_rate,
        depthwise_impl=model.depthwise_impl,
        dtype=jnp.dtype(model.dtype),
    )
