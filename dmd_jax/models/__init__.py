"""Flax Linen models. `build` turns a `config.model` into a module."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from dmd_jax.models.x3d import X3D


def build(model: ml_collections.ConfigDict, num_classes: int) -> X3D:
    """The classifier `config.model` describes, with `num_classes` outputs."""
    if model.name != "x3d":
        raise ValueError(f"unknown config.model.name {model.name!r}; available: 'x3d'")
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
