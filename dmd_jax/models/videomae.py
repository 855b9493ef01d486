"""VideoMAE (ViT on tubelets) in Flax Linen, computing what transformers'
`VideoMAEForVideoClassification` computes, so fine-tuned Kinetics checkpoints convert
one to one (`dmd_jax.convert.videomae`).

Tubelets of `tubelet_size x patch_size x patch_size` are embedded by a strided 3D conv,
a fixed sinusoidal table is added, then pre-norm transformer layers whose query and
value projections have biases and whose key projection has none. The head either
mean-pools the tokens and applies `fc_norm` (fine-tuned checkpoints) or reads the first
token after a final LayerNorm. Follows the classifier protocol of `dmd_jax.models`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

# ImageNet's, the default of VideoMAE's image processor (converted checkpoints store
# their own processor's values in model.json).
INPUT_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

VARIANTS: dict[str, dict[str, int]] = {  # ViT sizes of the VideoMAE paper
    "s": dict(hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "b": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "l": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed position table of the reference, computed in float64 like it."""
    exponent = 2 * (np.arange(dim) // 2) / dim
    angles = np.arange(num_positions)[:, None] / np.power(10000.0, exponent)[None, :]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def attention(q, k, v, impl: str, causal: bool = False) -> jnp.ndarray:
    """`jax.nn.dot_product_attention` with the runtime's implementation ('auto': jax's
    choice; 'xla'; 'cudnn', GPUs with bf16/fp16 only)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation=None if impl == "auto" else impl)


class SelfAttention(nn.Module):
    num_heads: int
    qv_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.num_heads)
        q = split(nn.Dense(dim, use_bias=self.qv_bias, dtype=self.dtype, name="query")(x))
        k = split(nn.Dense(dim, use_bias=False, dtype=self.dtype, name="key")(x))
        v = split(nn.Dense(dim, use_bias=self.qv_bias, dtype=self.dtype, name="value")(x))
        out = attention(q, k, v, self.attention_impl)
        return nn.Dense(dim, dtype=self.dtype, name="out")(rearrange(out, "b n h d -> b n (h d)"))


class EncoderLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    qv_bias: bool
    layer_norm_eps: float
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + SelfAttention(self.num_heads, self.qv_bias, self.dtype, self.attention_impl,
                              name="attention")(
            norm("layernorm_before")(x))
        y = nn.Dense(self.intermediate_size, dtype=self.dtype, name="intermediate")(
            norm("layernorm_after")(x))
        y = nn.gelu(y, approximate=False)  # transformers' "gelu" is the exact erf form
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="output")(y)


class Model(nn.Module):
    """`(logits, pooled features)` for clips `(B, T, H, W, 3)`, normalised."""

    num_classes: int
    patch_size: int = 16
    tubelet_size: int = 2
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    qv_bias: bool = True
    use_mean_pooling: bool = True
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32 (runtime setting)
    attention_impl: str = "auto"  # runtime setting, see `attention`

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        del train  # no dropout or BatchNorm in the fine-tuned model
        kernel = (self.tubelet_size, self.patch_size, self.patch_size)
        x = nn.Conv(self.hidden_size, kernel, strides=kernel, padding="VALID", dtype=self.dtype,
                    name="patch_embed")(x.astype(self.dtype))
        x = rearrange(x, "b t h w d -> b (t h w) d")
        x = x + jnp.asarray(sinusoid_table(x.shape[1], self.hidden_size), self.dtype)
        for i in range(self.num_layers):
            x = EncoderLayer(self.num_heads, self.intermediate_size, self.qv_bias,
                             self.layer_norm_eps, self.dtype, self.attention_impl,
                             name=f"layer{i}")(x)
        if self.use_mean_pooling:
            # The reference builds fc_norm with LayerNorm's default eps, not layer_norm_eps.
            features = nn.LayerNorm(1e-5, dtype=self.dtype, name="fc_norm")(x.mean(axis=1))
        else:
            features = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)[:, 0]
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(features)
        return logits.astype(jnp.float32), features.astype(jnp.float32)


VideoMAE = Model  # the name the architecture is known by
