"""`lame`: Laplacian Adjusted Maximum-likelihood Estimation (Boudiaf et al., CVPR 2022).

Nothing in the model changes: the source model (its running BatchNorm statistics, as
in the authors' code) gives each clip of the batch its class probabilities `p` and its
features, and LAME re-assigns the batch's labels jointly so that clips whose features
are close get similar labels. It minimises, over the soft assignments `y`,

    sum_i KL(y_i || p_i) - lambda sum_ij w_ij y_i . y_j

by the bound optimisation of the paper: `y_i <- softmax(log p_i + lambda sum_j w_ij y_j)`
until the energy stops changing (relative 1e-8) or after `max_steps` steps. The
affinity `w` is on L2-normalised features: `knn` (1 for each clip's `knn` nearest other
clips), `rbf` (a Gaussian whose width is the mean distance to the `knn`-th nearest
clip, the clip itself counted) or `linear` (cosine similarity). The defaults are the
ones of the authors' code and of Döbler et al.'s benchmark (rbf, knn 5, lambda 1, 100
steps). Because the batch's labels are solved together, LAME is built for streams whose
batches hold few classes (the `correlated` protocol), where entropy minimisation collapses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from dmd_jax.errors import ConfigValueError
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import Context, ForwardOnly

AFFINITIES = ("knn", "rbf", "linear")


class Method(ForwardOnly):

    SETTINGS = ("affinity", "knn", "bound_lambda", "max_steps", "force_symmetry")

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        if cfg.affinity not in AFFINITIES:
            raise ConfigValueError(f"config.adapt.lame.affinity={cfg.affinity!r}; use one of "
                                   f"{AFFINITIES}")
        if cfg.knn < 1 or cfg.max_steps < 1:
            raise ConfigValueError("config.adapt.lame.knn and max_steps must be at least 1")
        self.cfg = cfg
        super().__init__(edge, cfg, context)

    def variables(self, edge: Adaptable):
        return edge.model.variables

    def forward(self, edge: Adaptable, variables, clips: jax.Array) -> jax.Array:
        logits, features = edge.model.apply(variables, clips)
        kernel = affinity(normalize(features), self.cfg.affinity, self.cfg.knn)
        if self.cfg.force_symmetry:
            kernel = (kernel + kernel.T) / 2
        assignment = laplacian_assignment(jax.nn.log_softmax(logits), kernel,
                                          self.cfg.bound_lambda, self.cfg.max_steps)
        return jnp.log(jnp.maximum(assignment, 1e-30))  # scored by argmax, as logits


def normalize(features: jax.Array) -> jax.Array:
    return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def affinity(features: jax.Array, kind: str, knn: int) -> jax.Array:
    """(N, N) affinities of the batch's clips."""
    n = features.shape[0]
    if kind == "linear":
        return features @ features.T
    distance = jnp.linalg.norm(features[None] - features[:, None], axis=-1)
    if kind == "knn":  # the knn nearest *other* clips (the nearest, itself, is skipped)
        nearest = jnp.argsort(distance, axis=-1)[:, 1:min(knn + 1, n)]
        return jnp.zeros((n, n)).at[jnp.arange(n)[:, None], nearest].set(1.0)
    kth = jnp.sort(distance, axis=-1)[:, min(knn, n) - 1]  # itself included, at 0
    width = jnp.maximum(jnp.mean(kth), 1e-12)  # 0 for a batch of one clip
    return jnp.exp(-distance ** 2 / (2 * width ** 2))


def laplacian_assignment(log_probs: jax.Array, kernel: jax.Array, bound_lambda: float,
                         max_steps: int) -> jax.Array:
    """The soft labels minimising LAME's energy, by its fixed-point (bound) updates."""

    def energy(y, pairwise):
        return jnp.sum(-log_probs * y - bound_lambda * pairwise * y
                       + y * jnp.log(jnp.maximum(y, 1e-20)))

    def update(carry):
        step, y, old, _ = carry
        pairwise = kernel @ y
        y = jax.nn.softmax(log_probs + bound_lambda * pairwise, axis=-1)
        new = energy(y, pairwise)
        converged = (step > 1) & (jnp.abs(new - old) <= 1e-8 * jnp.abs(old))
        return step + 1, y, new, converged

    def running(carry):
        step, _, _, converged = carry
        return (step < max_steps) & ~converged

    start = (jnp.asarray(0), jax.nn.softmax(log_probs, axis=-1),
             jnp.asarray(jnp.inf, log_probs.dtype), jnp.asarray(False))
    return jax.lax.while_loop(running, update, start)[1]
