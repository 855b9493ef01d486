"""`sar` (Niu et al., ICLR 2023): sharpness-aware (SAM) entropy minimisation on reliable
clips, and a reset to the source model when the moving average of the loss falls below
a bound (the sign of a collapse onto few classes).

As the authors' code (mr-eggplant/SAR, `SAR.forward`): a reset restores the normalisation
parameters only. SGD's momentum carries over (their SAM's `load_state_dict` restores its
own state, not its base optimizer's) and so does the loss average (`self.ema = ema` after
`self.reset()`), so while the average stays below the bound the next steps reset again.
`full_reset=True` restarts momentum and average too (a clean restart, dmd_jax's earlier
behaviour); the authors' code also hard-codes the bound at 0.2, here `reset_loss_ema`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dmd_jax.tta import losses
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import Context, GradientTTA


class Method(GradientTTA):
    SETTINGS = GradientTTA.SETTINGS + ("margin_factor", "sam_rho", "reset_loss_ema",
                                       "full_reset")

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        self.margin = losses.reliability_margin(edge.num_classes, cfg.margin_factor)
        super().__init__(edge, cfg, context)

    def extra_state(self) -> dict[str, Any]:
        return {"loss_ema": jnp.array(0.0), "has_ema": jnp.array(False)}

    def step(self, state, const, clips):
        def first_loss(params):
            logits = self.logits(params, const, clips)
            ent = losses.entropy(logits)
            reliable = ent < self.margin
            return losses.masked_mean(ent, reliable), (logits, reliable)

        def second_loss(params, reliable):
            ent = losses.entropy(self.logits(params, const, clips))
            keep = reliable & (ent < self.margin)
            return losses.masked_mean(ent, keep), keep

        params = state["params"]
        (_, (logits, reliable)), grads = jax.value_and_grad(first_loss, has_aux=True)(params)
        scale = self.cfg.sam_rho / (optax.global_norm(grads) + 1e-12)
        perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
        (loss2, keep), grads2 = jax.value_and_grad(second_loss, has_aux=True)(perturbed, reliable)
        new = self.sgd(state, grads2)  # the step is taken from the unperturbed parameters
        counted = jnp.any(keep)
        ema = jnp.where(new["has_ema"], 0.9 * new["loss_ema"] + 0.1 * loss2, loss2)
        new["loss_ema"] = jnp.where(counted, ema, new["loss_ema"])
        new["has_ema"] = new["has_ema"] | counted
        reset = new["has_ema"] & (new["loss_ema"] < self.cfg.reset_loss_ema)
        fresh = self.initial_state(const["source"])
        if not self.cfg.full_reset:  # the authors': only the parameters go back
            fresh = {**new, "params": fresh["params"]}
        new = jax.tree.map(lambda f, n: jnp.where(reset, f, n), fresh, new)
        return new, logits, {"loss": loss2, "learned_from": reliable, "reset": reset}
