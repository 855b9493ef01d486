"""The losses and reliability weights of Tent, EATA, SAR and CEMA (METHODS.md §2-3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmd_jax.confidence import entropy  # noqa: F401  (the one definition; re-exported)


def reliability_margin(num_classes: int, factor: float = 0.4) -> float:
    """`E0 = 0.4 ln C`: clips above it are unreliable (EATA, SAR, CEMA)."""
    return factor * float(jnp.log(num_classes))


def reliability_weight(ent: jnp.ndarray, margin: float) -> jnp.ndarray:
    """`exp(E0 - H)`, not differentiated: confident clips count more (EATA, CEMA)."""
    return jax.lax.stop_gradient(jnp.exp(margin - ent))


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean over the selected rows; 0 when none is (fixed shapes under jit)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def distillation(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                 temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-clip `(T^2 KL(p_teacher^T || p_student^T), CE(p_student, argmax p_teacher))`;
    the teacher is not differentiated."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = temperature ** 2 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    hard = jnp.argmax(teacher_logits, axis=-1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(student_logits, axis=-1),
                              hard[:, None], axis=-1)[:, 0]
    return kl, ce


def cosine_to(reference: jnp.ndarray, probs: jnp.ndarray) -> jnp.ndarray:
    """Cosine similarity of each row of `probs` to `reference` (EATA's redundancy test)."""
    num = probs @ reference
    den = jnp.linalg.norm(probs, axis=-1) * jnp.linalg.norm(reference)
    return num / jnp.maximum(den, 1e-8)
