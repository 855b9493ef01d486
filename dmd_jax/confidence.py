"""How sure a classifier is of a clip: the one definition of entropy and its relatives.

Used by the confidence routers, the switcher's inputs, and every test-time adaptation
method (Tent's loss, EATA's and CEMA's reliability filters and weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy(logits: jnp.ndarray) -> jnp.ndarray:
    """Per-row Shannon entropy `-sum p log p` of the softmax, in nats (float32 at least)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def confidence_stats(logits: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Max probability, entropy and top-2 margin of `softmax(logits)`, per row."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top2 = jax.lax.top_k(p, 2)[0]
    return {"max_prob": top2[..., 0], "entropy": entropy(logits.astype(jnp.float32)),
            "margin": top2[..., 0] - top2[..., 1]}
