"""`vitta` (Lin et al., ICCV 2023, "Video Test-Time Adaptation for Action Recognition"):
the video-specific method. It aligns the statistics of the edge's features on the test
stream with those of the clean training clips, and makes the predictions of two
temporally and spatially augmented views of each clip agree.

As in the authors' code (wlin-at/ViTTA, its defaults):

- BatchNorm normalises with the *source* running statistics (`fix_BNS`); what adapts is
  every parameter (`parameters="all"`; `"norm_affine"` for the scale/bias only, their
  `--update_only_bn_affine`), by SGD with momentum 0.9 and weight decay 5e-4, lr 5e-5.
- Alignment: at every normalisation layer of the chosen stages (`layers`: name prefixes;
  the last two stages, as their `layer3`/`layer4` of a ResNet) the per-channel mean and
  variance of the layer's output over clips, frames and pixels of both views together;
  their exponential moving average over the stream (momentum 0.1, starting from 0, the
  past detached) is compared with the same statistics of the source model on clean
  training clips by an L1 distance (mean over channels, mean and variance), summed over
  the layers.
- Consistency: the L1 distance of each view's softmax to the views' mean softmax, summed
  over the classes, averaged over the views and the clips, weighted 0.1. (Theirs sums
  over the batch too, at their batch size of 1 the same; at 64 clips a sum makes the
  consistency term 64 times stronger and collapsed the demo's edge within a few batches.)
- The views: a random temporal crop (at least `min_frames_fraction` of the frames,
  resampled to the clip's length: temporal jitter of the sampling grid, as their
  `uniform_equidist` sampling with random offsets) and a random spatial crop (at least
  `min_crop_fraction` of each side, resized back).

One deliberate difference: the scored prediction of a batch is the unaugmented clip's,
made before the update (every method here is scored so); ViTTA's evaluation scores the
clip after its update, which on a stream is the next batch's view of the same parameters.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dmd_jax import parallel
from dmd_jax.errors import ConfigValueError
from dmd_jax.tta.adaptable import Adaptable, Params, merge
from dmd_jax.tta.base import Context, GradientTTA

PARAMETERS = ("all", "norm_affine")  # what adapts


class Method(GradientTTA):
    SETTINGS = GradientTTA.SETTINGS + (
        "weight_decay", "parameters", "layers", "stats_momentum", "align_weight",
        "consistency_weight", "views", "min_frames_fraction", "min_crop_fraction",
        "source_split", "source_clips")

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        if cfg.parameters not in PARAMETERS:
            raise ConfigValueError(f"config.adapt.vitta.parameters={cfg.parameters!r}; use one of "
                                   f"{PARAMETERS}")
        if cfg.views < 2:
            raise ConfigValueError("config.adapt.vitta.views must be at least 2 (the consistency "
                                   "of their predictions is half of ViTTA)")
        self.cfg, self.model, self._seed = cfg, edge, context.seed
        self._source_stats = source_statistics(
            edge, tuple(cfg.layers), context.clean_batches(cfg.source_split, cfg.source_clips),
            context.mesh)
        if not self._source_stats:
            raise ConfigValueError(f"config.adapt.vitta.layers={tuple(cfg.layers)} matches no "
                                   "normalisation layer of the edge model")
        super().__init__(edge, cfg, context)

    def make_optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(self.cfg.weight_decay),  # torch SGD's
                           optax.sgd(self.cfg.learning_rate, momentum=self.cfg.momentum))

    def source_params(self) -> Params:
        if self.cfg.parameters == "all":
            return jax.device_get(self.model.model.variables["params"])
        return self.model.source_norm_affine

    def extra_constants(self) -> dict[str, Any]:
        return {"source_stats": self._source_stats}

    def extra_state(self) -> dict[str, Any]:
        zeros = jax.tree.map(jnp.zeros_like, self._source_stats)
        return {"stats_ema": zeros, "step": jnp.zeros((), jnp.int32)}

    def step(self, state, const, clips):
        cfg = self.cfg
        logits = jax.lax.stop_gradient(self._apply(state["params"], const, clips)[0])
        views = jnp.concatenate([
            augment(clips, jax.random.fold_in(jax.random.key(self._seed), state["step"] * cfg.views + v),
                    cfg.min_frames_fraction, cfg.min_crop_fraction)
            for v in range(cfg.views)])

        def loss_fn(params):
            view_logits, stats = self._apply(params, const, views)
            ema = jax.tree.map(lambda new, old: cfg.stats_momentum * new
                               + (1 - cfg.stats_momentum) * jax.lax.stop_gradient(old),
                               stats, state["stats_ema"])
            align = sum(jnp.mean(jnp.abs(ema[k][0] - const["source_stats"][k][0]))
                        + jnp.mean(jnp.abs(ema[k][1] - const["source_stats"][k][1])) for k in ema)
            probs = jax.nn.softmax(view_logits.reshape(cfg.views, clips.shape[0], -1), axis=-1)
            consistency = jnp.sum(jnp.abs(probs - probs.mean(0))) / (cfg.views * clips.shape[0])
            return cfg.align_weight * align + cfg.consistency_weight * consistency, ema

        (loss, ema), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new = self.sgd(state, grads)
        new["stats_ema"], new["step"] = ema, state["step"] + 1
        return new, logits, {"loss": loss, "learned_from": jnp.ones(clips.shape[0], bool)}

    def _apply(self, params: Params, const: dict[str, Any], clips: jax.Array
               ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
        """Logits with the source running statistics, and the chosen layers' statistics."""
        model = const["model"]
        full = params if self.cfg.parameters == "all" else merge(params, model["frozen"])
        return apply_recording(self.model, {"params": full, **model["others"]}, clips,
                               tuple(self.cfg.layers))


def apply_recording(model: Adaptable, variables: dict[str, Any], clips: jax.Array,
                    layers: tuple[str, ...]) -> tuple[jax.Array, dict[str, Any]]:
    """The model in inference mode (running statistics, no dropout) on uint8 clips, and
    for every normalisation layer whose path starts with one of `layers` the per-channel
    mean and (biased) variance of its output over every other axis."""
    x = model.model.prepare(clips)
    with nn.intercept_methods(_recorder(layers)):
        (logits, _), sown = model.model.module.apply(variables, x, train=False,
                                                     mutable=["intermediates"])
    flat = flax.traverse_util.flatten_dict(sown.get("intermediates", {}))
    stats = {"/".join(path[:-1]): value[0] for path, value in flat.items()}
    return logits, stats


def _recorder(layers: tuple[str, ...]):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if (context.method_name == "__call__" and isinstance(module, (nn.BatchNorm, nn.LayerNorm))
                and module.path and module.path[0].startswith(layers)):
            wide = out.astype(jnp.float32)
            axes = tuple(range(out.ndim - 1))
            module.sow("intermediates", "vitta_stats", (jnp.mean(wide, axes), jnp.var(wide, axes)))
        return out

    return intercept


def source_statistics(edge: Adaptable, layers: tuple[str, ...], batches, mesh
                      ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The chosen layers' output statistics of the source model on clean clips, averaged
    over the batches (the authors' offline `compute_stats` step)."""
    variables = parallel.put_replicated(edge.model.variables, mesh)
    record = jax.jit(lambda v, clips: apply_recording(edge, v, clips, layers)[1],
                     out_shardings=parallel.replicated(mesh))
    per_batch = [record(variables, clips) for clips in batches]
    if not per_batch:
        raise ConfigValueError("config.adapt.vitta.source_clips gives no full batch of clean "
                               "clips for the source statistics; raise it")
    return jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *per_batch))


def augment(clips: jax.Array, key: jax.Array, min_frames: float, min_crop: float) -> jax.Array:
    """One random view of every clip (uint8, (B, T, H, W, 3)): a temporal crop of at
    least `min_frames` of the frames resampled to T, and a spatial crop of at least
    `min_crop` of each side resized back; the same crop for the whole batch."""
    b, t, h, w, c = clips.shape
    k_len, k_start, k_size, k_y, k_x = jax.random.split(key, 5)
    length = jax.random.uniform(k_len, (), minval=min_frames, maxval=1.0) * t
    start = jax.random.uniform(k_start, ()) * (t - length)
    frames = jnp.clip(jnp.floor(start + (jnp.arange(t) + 0.5) * length / t), 0, t - 1).astype(int)
    side = jax.random.uniform(k_size, (), minval=min_crop, maxval=1.0)
    top = jax.random.uniform(k_y, ()) * (1 - side)
    left = jax.random.uniform(k_x, ()) * (1 - side)
    video = clips[:, frames].astype(jnp.float32)
    scale = jnp.asarray([1 / side, 1 / side])
    translation = -jnp.asarray([top * h, left * w]) * scale
    resized = jax.vmap(jax.vmap(lambda frame: jax.image.scale_and_translate(
        frame, (h, w, c), (0, 1), scale, translation, "linear")))(video)
    return jnp.clip(jnp.round(resized), 0, 255).astype(clips.dtype)
