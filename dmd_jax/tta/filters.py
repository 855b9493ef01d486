"""EATA's sample filters, the one definition that EATA's step and CEMA's edge both use.

- *reliable*: entropy below a margin (`E0 = 0.4 ln C`, or CEMA's dynamic `E_max(t)`);
- *novel* (not redundant): `|cos(m, p)| < margin`, `m` the moving average of the
  probabilities of the clips selected so far (no average yet: every clip is novel);
- the moving average itself, updated with the selected clips' mean probabilities.

Pure jnp functions: EATA runs them inside its jitted step, CEMA's edge on the host.
"""

from __future__ import annotations

import jax.numpy as jnp

from dmd_jax.tta import losses


def redundancy_margin(margin: float, reference_classes: int, num_classes: int) -> float:
    """EATA's redundancy margin for `num_classes`: given for `reference_classes` (0.05 for
    ImageNet's 1000), scaled by sqrt(reference / C), as a confident clip's cosine to a
    uniform average is 1/sqrt(C); rounded to 0.01. `reference_classes=0`: as given."""
    if reference_classes <= 0:
        return float(margin)
    return round(float(margin) * (reference_classes / num_classes) ** 0.5, 2)


def reliable(ent: jnp.ndarray, margin: float | jnp.ndarray) -> jnp.ndarray:
    return ent < margin


def novel(probs: jnp.ndarray, probs_ema: jnp.ndarray, has_ema: jnp.ndarray,
          margin: float) -> jnp.ndarray:
    cos = losses.cosine_to(probs_ema, probs)
    return jnp.where(has_ema, jnp.abs(cos) < margin, True)


def update_probs_ema(probs_ema: jnp.ndarray, has_ema: jnp.ndarray, probs: jnp.ndarray,
                     keep: jnp.ndarray, decay: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The moving average of the selected clips' probabilities (unchanged if none)."""
    count = jnp.sum(keep)
    batch_mean = jnp.sum(probs * keep[:, None], axis=0) / jnp.maximum(count, 1)
    blended = jnp.where(has_ema, decay * probs_ema + (1 - decay) * batch_mean, batch_mean)
    return jnp.where(count > 0, blended, probs_ema), has_ema | (count > 0)
