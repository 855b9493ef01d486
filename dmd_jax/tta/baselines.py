"""The test-time adaptation baselines of METHODS.md §3, on the edge model itself.

Each method is a small object holding its state (adapted parameters, optimiser state,
filters) on the device and one jitted step, so a stream compiles it once per batch shape:

- `Source`: the model as trained;
- `Norm`: BatchNorm with the test batch's statistics, nothing learnt;
- `Tent`: entropy of every clip, SGD on the norm affine parameters;
- `EATA`: reliability-weighted entropy on reliable, non-redundant clips, plus a Fisher
  regulariser that keeps parameters important on clean data in place;
- `SAR`: sharpness-aware entropy on reliable clips, and a reset when the loss's moving
  average collapses below 0.2.

`process(clips)` returns the predictions made *before* the batch's update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dmd_jax import parallel
from dmd_jax.tta import losses
from dmd_jax.tta.adaptable import Adaptable, Params


@dataclasses.dataclass
class BatchResult:
    """What a method did with one stream batch."""

    logits: np.ndarray  # (B, C): the predictions that are scored, made before any update
    learned_from: np.ndarray  # (B,) bool: the clips the adaptation used
    uploaded: np.ndarray  # (B,) bool: the clips that left the edge (CEMA only)
    loss: float = float("nan")  # nan: no update this batch
    updated: bool = False  # whether the model changed after this batch
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_steps: int = 0
    self_resets: int = 0  # resets the method's own rule made (SAR)
    # CEMA: per upload filter, the (B,) mask of clips it turned down; None: no filters ran
    filter_failed: dict[str, np.ndarray] | None = None


class Method(Protocol):
    name: str

    def reset(self) -> None:
        """Back to the source model, with fresh optimiser and filter states."""

    def process(self, clips: jax.Array) -> BatchResult:
        """Predicts a batch of uint8 clips (sharded over the mesh), then adapts on it."""


def _none(batch_size: int) -> np.ndarray:
    return np.zeros(batch_size, bool)


class Source:
    name = "source"

    def __init__(self, model: Adaptable, mesh):
        batch = parallel.batch_sharded(mesh)
        self._variables = parallel.put_replicated(model.model.variables, mesh)
        self._forward = jax.jit(
            lambda variables, clips: dataclasses.replace(
                model.model, variables=variables).classify(clips)[0],
            in_shardings=(parallel.replicated(mesh), batch), out_shardings=batch)

    def reset(self) -> None:
        pass

    def process(self, clips: jax.Array) -> BatchResult:
        logits = parallel.fetch(self._forward(self._variables, clips))
        return BatchResult(logits, _none(len(logits)), _none(len(logits)))


class Norm(Source):
    name = "norm"

    def __init__(self, model: Adaptable, mesh):
        batch = parallel.batch_sharded(mesh)
        self._variables = parallel.put_replicated(
            {"norm_affine": model.source_norm_affine, "constants": model.constants()}, mesh)
        self._forward = jax.jit(
            lambda v, clips: model.logits(v["norm_affine"], v["constants"], clips),
            in_shardings=(parallel.replicated(mesh), batch), out_shardings=batch)


class GradientTTA:
    """Shared machinery of the gradient-based baselines: state, optimiser, jitted step.

    Subclasses define `step(state, const, clips) -> (state, logits, aux)`, where `const`
    holds the frozen model (`model`), the source parameters (`source`) and whatever
    `extra_constants()` adds, and `aux` holds `loss` and `learned_from` (and `reset`
    where the method resets itself); and `extra_state(...)` for their own state.
    """

    name = "gradient_tta"

    def __init__(self, model: Adaptable, mesh, cfg: ml_collections.ConfigDict):
        self.model, self.cfg, self._mesh = model, cfg, mesh
        self.margin = losses.reliability_margin(model.num_classes, cfg.margin_factor)
        self.optimizer = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
        self.const = parallel.put_replicated(
            {"model": model.constants(), "source": model.source_norm_affine,
             **self.extra_constants()}, mesh)
        replicated, batch = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        self._step = jax.jit(self.step, donate_argnums=0,
                             in_shardings=(replicated, replicated, batch),
                             out_shardings=(replicated, batch, replicated))
        self.reset()

    def initial_state(self, source: Params) -> dict[str, Any]:
        return {"params": source, "opt": self.optimizer.init(source), **self.extra_state()}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def extra_constants(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        self.state = parallel.put_replicated(
            self.initial_state(self.model.source_norm_affine), self._mesh)

    def process(self, clips: jax.Array) -> BatchResult:
        self.state, logits, aux = self._step(self.state, self.const, clips)
        logits, aux = parallel.fetch((logits, aux))  # learned_from is batch-sharded
        learned_from = np.asarray(aux["learned_from"], bool)
        return BatchResult(logits, learned_from, _none(len(logits)),
                           loss=float(aux["loss"]) if learned_from.any() else float("nan"),
                           updated=bool(learned_from.any()),
                           self_resets=int(aux.get("reset", 0)))

    def step(self, state, const, clips):
        raise NotImplementedError

    def logits(self, params: Params, const: dict[str, Any], clips: jax.Array) -> jax.Array:
        return self.model.logits(params, const["model"], clips)

    def _sgd(self, state: dict[str, Any], grads: Params) -> dict[str, Any]:
        updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates), "opt": opt}


class Tent(GradientTTA):
    name = "tent"

    def step(self, state, const, clips):
        def loss_fn(params):
            logits = self.logits(params, const, clips)
            return jnp.mean(losses.entropy(logits)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        aux = {"loss": loss, "learned_from": jnp.ones(logits.shape[0], bool)}
        return self._sgd(state, grads), logits, aux


class EATA(GradientTTA):
    """EATA (Niu et al. 2022). `fisher_batches`: clean uint8 batches on the mesh."""

    name = "eata"

    def __init__(self, model: Adaptable, mesh, cfg: ml_collections.ConfigDict,
                 fisher_batches: Iterable[jax.Array]):
        self._fisher = fisher_information(model, fisher_batches, mesh)
        super().__init__(model, mesh, cfg)

    def extra_constants(self) -> dict[str, Any]:
        return {"fisher": self._fisher}

    def extra_state(self) -> dict[str, Any]:
        return {"probs_ema": jnp.zeros(self.model.num_classes), "has_ema": jnp.array(False)}

    def step(self, state, const, clips):
        def loss_fn(params):
            logits = self.logits(params, const, clips)
            ent = losses.entropy(logits)
            probs = jax.nn.softmax(logits)
            keep = select_reliable_novel(ent, probs, self.margin, state["probs_ema"],
                                         state["has_ema"], self.cfg.redundancy_margin)
            weighted = losses.masked_mean(losses.reliability_weight(ent, self.margin) * ent, keep)
            penalty = fisher_penalty(params, const["source"], const["fisher"])
            return weighted + self.cfg.fisher_alpha * penalty, (logits, probs, keep)

        (loss, (logits, probs, keep)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state["params"])
        any_kept = jnp.any(keep)
        stepped = self._sgd(state, grads)  # EATA skips the step when no clip is selected
        new = jax.tree.map(lambda n, o: jnp.where(any_kept, n, o), stepped, state)
        new["probs_ema"], new["has_ema"] = update_probs_ema(
            state["probs_ema"], state["has_ema"], probs, keep, self.cfg.ema_decay)
        return new, logits, {"loss": loss, "learned_from": keep}


def fisher_penalty(params: Params, anchor: Params, fisher: Params) -> jnp.ndarray:
    """EATA's anti-forgetting term `sum F (theta - theta_source)^2`."""
    return sum(jnp.sum(fisher[k] * (params[k] - anchor[k]) ** 2) for k in params)


def select_reliable_novel(ent: jnp.ndarray, probs: jnp.ndarray, margin: float,
                          probs_ema: jnp.ndarray, has_ema: jnp.ndarray,
                          redundancy_margin: float) -> jnp.ndarray:
    """EATA's filters: reliable (`H < E0`) and not redundant (`|cos(m, p)| < 0.05`, only
    once a moving average `m` of selected clips' probabilities exists)."""
    reliable = ent < margin
    novel = jnp.abs(losses.cosine_to(probs_ema, probs)) < redundancy_margin
    return reliable & jnp.where(has_ema, novel, True)


def update_probs_ema(probs_ema: jnp.ndarray, has_ema: jnp.ndarray, probs: jnp.ndarray,
                     keep: jnp.ndarray, decay: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """EATA's moving average of the selected clips' probabilities (unchanged if none)."""
    count = jnp.sum(keep)
    batch_mean = jnp.sum(probs * keep[:, None], axis=0) / jnp.maximum(count, 1)
    blended = jnp.where(has_ema, decay * probs_ema + (1 - decay) * batch_mean, batch_mean)
    return jnp.where(count > 0, blended, probs_ema), has_ema | (count > 0)


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
        raise ValueError("EATA needs clean clips for its Fisher information; none were given")
    return jax.tree.map(lambda x: x / count, total)


class SAR(GradientTTA):
    """SAR (Niu et al. 2023): SAM on reliable clips, reset when the loss EMA < 0.2."""

    name = "sar"

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
        new = self._sgd(state, grads2)  # the step is taken from the unperturbed parameters
        counted = jnp.any(keep)
        ema = jnp.where(new["has_ema"], 0.9 * new["loss_ema"] + 0.1 * loss2, loss2)
        new["loss_ema"] = jnp.where(counted, ema, new["loss_ema"])
        new["has_ema"] = new["has_ema"] | counted
        reset = new["has_ema"] & (new["loss_ema"] < self.cfg.reset_loss_ema)
        fresh = self.initial_state(const["source"])
        new = jax.tree.map(lambda f, n: jnp.where(reset, f, n), fresh, new)
        return new, logits, {"loss": loss2, "learned_from": reliable, "reset": reset}
