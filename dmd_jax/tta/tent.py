"""`tent` (Wang et al., ICLR 2021): the entropy of every clip's prediction, minimised by
SGD on the normalisation layers' scale and bias, with test-batch BatchNorm statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmd_jax.tta import losses
from dmd_jax.tta.base import GradientTTA


class Method(GradientTTA):

    def step(self, state, const, clips):
        def loss_fn(params):
            logits = self.logits(params, const, clips)
            return jnp.mean(losses.entropy(logits)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        aux = {"loss": loss, "learned_from": jnp.ones(logits.shape[0], bool)}
        return self.sgd(state, grads), logits, aux
