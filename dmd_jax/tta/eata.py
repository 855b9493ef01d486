"""`eata` (Niu et al., ICML 2022): reliability-weighted entropy on the clips that are
reliable (`H < E0`) and not redundant with those already learnt from, plus a Fisher
regulariser that keeps the parameters important on clean data near their source values.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dmd_jax import parallel
from dmd_jax.errors import ConfigValueError
from dmd_jax.tta import filters, losses
from dmd_jax.tta.adaptable import Adaptable, Params
from dmd_jax.tta.base import Context, GradientTTA


class Method(GradientTTA):
    SETTINGS = GradientTTA.SETTINGS + (
        "margin_factor", "redundancy_margin", "margin_reference_classes", "ema_decay",
        "fisher_alpha", "fisher_split", "fisher_clips")

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        self.margin = losses.reliability_margin(edge.num_classes, cfg.margin_factor)
        self.redundancy = filters.redundancy_margin(
            cfg.redundancy_margin, cfg.margin_reference_classes, edge.num_classes)
        self._fisher = fisher_information(
            edge, context.clean_batches(cfg.fisher_split, cfg.fisher_clips), context.mesh)
        super().__init__(edge, cfg, context)

    def extra_constants(self) -> dict[str, Any]:
        return {"fisher": self._fisher}

    def extra_state(self) -> dict[str, Any]:
        return {"probs_ema": jnp.zeros(self.model.num_classes), "has_ema": jnp.array(False)}

    def step(self, state, const, clips):
        def loss_fn(params):
            logits = self.logits(params, const, clips)
            ent = losses.entropy(logits)
            probs = jax.nn.softmax(logits)
            keep = filters.reliable(ent, self.margin) & filters.novel(
                probs, state["probs_ema"], state["has_ema"], self.redundancy)
            weighted = losses.masked_mean(losses.reliability_weight(ent, self.margin) * ent, keep)
            penalty = fisher_penalty(params, const["source"], const["fisher"])
            return weighted + self.cfg.fisher_alpha * penalty, (logits, probs, keep)

        (loss, (logits, probs, keep)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state["params"])
        any_kept = jnp.any(keep)
        stepped = self.sgd(state, grads)  # EATA skips the step when no clip is selected
        new = jax.tree.map(lambda n, o: jnp.where(any_kept, n, o), stepped, state)
        new["probs_ema"], new["has_ema"] = filters.update_probs_ema(
            state["probs_ema"], state["has_ema"], probs, keep, self.cfg.ema_decay)
        return new, logits, {"loss": loss, "learned_from": keep}


def fisher_penalty(params: Params, anchor: Params, fisher: Params) -> jnp.ndarray:
    """EATA's anti-forgetting term `sum F (theta - theta_source)^2`."""
    return sum(jnp.sum(fisher[k] * (params[k] - anchor[k]) ** 2) for k in params)


def fisher_information(model: Adaptable, batches: Iterable[jax.Array], mesh) -> Params:
    """EATA's diagonal Fisher of the norm affine parameters on clean clips: the squared
    gradient of the cross-entropy to the model's own predictions, averaged over batches."""
    def squared_grad(source, constants, clips):
        def loss_fn(params):
            logits = model.logits(params, constants, clips)
            pseudo = jax.lax.stop_gradient(jnp.argmax(logits, -1))
            return optax.softmax_cross_entropy_with_integer_labels(logits, pseudo).mean()
        return jax.tree.map(jnp.square, jax.grad(loss_fn)(source))

    replicated = parallel.replicated(mesh)
    squared_grad = jax.jit(squared_grad, in_shardings=(replicated, replicated,
                                                       parallel.batch_sharded(mesh)),
                           out_shardings=replicated)
    source, constants = parallel.put_replicated(
        (model.source_norm_affine, model.constants()), mesh)
    total, count = None, 0
    for clips in batches:
        g = squared_grad(source, constants, clips)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if not count:
        raise ConfigValueError("EATA needs clean clips for its Fisher information; none were given "
                         "(config.adapt.eata.fisher_clips is below one stream batch?)")
    return jax.tree.map(lambda x: x / count, total)
