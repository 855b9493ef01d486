"""bf16 compute with float32 parameters stays within 1e-2 (relative) of float32 logits."""

import jax
import jax.numpy as jnp
import pytest

from dmd_jax.models import videomae, x3d


def _relative_error(make, x):
    f32 = make(jnp.float32)
    variables = f32.init(jax.random.key(0), x)
    ref, _ = jax.jit(f32.apply)(variables, x)
    out, _ = jax.jit(make(jnp.bfloat16).apply)(variables, x)
    assert out.dtype == jnp.float32  # logits come back in float32 for the loss
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


@pytest.mark.parametrize("make,shape", [
    (lambda dt: x3d.X3D(num_classes=10, width_factor=0.5, depth_factor=0.5, head_dim=64,
                        depthwise_impl="xla", dtype=dt), (2, 4, 32, 32, 3)),
    (lambda dt: videomae.VideoMAE(num_classes=10, patch_size=8, hidden_size=64, num_layers=2,
                                  num_heads=4, intermediate_size=128, dtype=dt), (2, 4, 32, 32, 3)),
])
def test_bf16_logits_close_to_float32(make, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    error = _relative_error(make, x)
    assert 0 < error <= 1e-2  # > 0: bf16 really ran
