"""The DMD switcher: a tiny MLP that reads what the edge already computed.

Input: the edge's pooled penultimate features, concatenated with three statistics of
its logits (max probability, entropy, top-2 margin). Output: the logit of
`P(aligned)`, the probability that the edge's answer agrees with the cloud's (or, for
the ground-truth ablation, that it is right). A clip goes to the cloud when that
probability is low. It costs a few thousand FLOPs next to the edge's millions.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def confidence_stats(logits: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Max probability, entropy and top-2 margin of `softmax(logits)`, per row."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    top2 = jax.lax.top_k(p, 2)[0]
    return {"max_prob": top2[..., 0], "entropy": -jnp.sum(p * log_p, axis=-1),
            "margin": top2[..., 0] - top2[..., 1]}


class Switcher(nn.Module):
    """MLP over `LayerNorm(features) ⊕ (max_prob, entropy, margin)` -> one logit."""

    hidden: Sequence[int] = (128, 64)
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, features: jnp.ndarray, edge_logits: jnp.ndarray, *,
                 train: bool = False) -> jnp.ndarray:
        stats = confidence_stats(edge_logits)
        # Features are unbounded post-activation values; the statistics are already O(1).
        x = jnp.concatenate([nn.LayerNorm(name="feature_norm")(features.astype(jnp.float32)),
                             jnp.stack([stats["max_prob"], stats["entropy"], stats["margin"]],
                                       axis=-1)], axis=-1)
        for i, width in enumerate(self.hidden):
            x = nn.gelu(nn.Dense(width, name=f"dense{i}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(1, name="out")(x)[..., 0]
