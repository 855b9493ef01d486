"""CEMA (METHODS.md §2): the edge predicts and uploads; the cloud adapts and sends back.

Two objects with an explicit message boundary, as on real hardware:

- `Edge` only runs forward passes. It scores every clip, keeps the ones that are
  reliable (`H < E_max(t)`), informative (`H > E_min ln C`) and not redundant, and sends
  them up as an `Upload` of uint8 clips, exactly as stored. It never computes a gradient.
- `Cloud` holds the replay buffer, the foundation model, a copy of the edge model and
  both optimiser states. On every 32 new clips it adapts the foundation model on them by
  weighted entropy, then distils it into the edge copy's normalisation parameters on the
  new clips plus 96 replayed ones (once the buffer holds 256); with no new step but a
  full enough buffer, the edge copy learns from 128 replayed clips alone (replay-only steps
  fill each upload's up to `min_cloud_steps`; the authors' 1: one step). The edge's new
  parameters go back down as a `Download`. Where METHODS.md §2 leaves the order open,
  this follows the official CEMA code (foundation on new clips only, distillation
  targets from the updated foundation model).

`Method` (the adaptation protocol, `dmd_jax.tta`) joins the two for a stream; its
variants (`cloud_all`: every clip uploaded; `cema_tbr`: batch renormalisation; ...) are
config, `config.adapt.variants`. The cloud runs on the largest part of the mesh whose size
divides its 32/96/128-clip batches, so any device count works.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dmd_jax import parallel, uploads
from dmd_jax.errors import UserError


class CloudConfigError(UserError, ValueError):
    """CEMA's cloud cannot run with these settings or models."""
from dmd_jax.tta import base, filters, losses
from dmd_jax.tta.adaptable import Adaptable, Params, num_bytes
from dmd_jax.tta.base import BatchResult, Context


@dataclasses.dataclass(frozen=True)
class Upload:
    """Edge -> cloud: the selected clips, uint8 as stored; with batch renormalisation, once,
    the running statistics the edge started from (its first stream batch's)."""

    clips: np.ndarray  # (n, T, H, W, 3) uint8: what the cloud receives (decoded, if encoded)
    stats: Any = None
    encoded_bytes: int | None = None  # the clips' size on the link when sent encoded

    @property
    def nbytes(self) -> int:
        clips = self.clips.nbytes if self.encoded_bytes is None else self.encoded_bytes
        return int(clips) + (num_bytes(self.stats) if self.stats is not None else 0)


@dataclasses.dataclass(frozen=True)
class Download:
    """Cloud -> edge: the adapted normalisation parameters of the edge model, and with
    batch renormalisation the running statistics they go with."""

    norm_affine: Params  # host numpy arrays
    stats: Any = None

    @property
    def nbytes(self) -> int:
        return num_bytes(self.norm_affine) + num_bytes(self.stats)


def forward(model: Adaptable, params: Params, stats: Any, constants: dict[str, Any],
            clips: jax.Array, mode: str, batch_renorm: bool) -> tuple[jax.Array, Any]:
    """`(logits, statistics)`: with `batch_renorm`, BatchNorm normalises with running
    statistics (`renorm.interceptor(mode)`); without, with the batch's own statistics
    (METHODS.md §2's wording) and `stats` passes through untouched."""
    if batch_renorm:
        return model.renorm_logits(params, stats, constants, clips, mode)
    return model.logits(params, constants, clips), stats


def forward_outputs(model: Adaptable, params: Params, stats: Any, constants: dict[str, Any],
                    clips: jax.Array, mode: str, batch_renorm: bool
                    ) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """`((logits, features), statistics)`, normalised as `forward`: the edge's pass, whose
    features a router may read."""
    if batch_renorm:
        return model.renorm_outputs(params, stats, constants, clips, mode)
    return model.outputs(params, constants, clips), stats


def stats_template(model: Adaptable, batch_renorm: bool) -> Any:
    """Arrays shaped like the running statistics (their values are set from the first
    batch), or an empty placeholder without renormalisation."""
    if batch_renorm and model.has_batch_norm:
        return jax.device_get(model.model.variables["batch_stats"])
    return {}


FILTERS = ("unreliable", "low_info", "redundant")


class UploadFilter:
    """The edge's three upload filters, on the host (they are sequential and tiny).

    Unreliable exclusion `H < E_max(t)`: `E_max = E0` until `warmup_clips` clips have
    been seen; then, if `dynamic_emax`, `E0 * lam * mean_H(t) / mean_H(warm-up)`, the
    running mean of every edge entropy so far over its value at the end of the warm-up.
    Low-informative exclusion `H > e_min * ln C`. Redundancy: EATA's filter
    (`dmd_jax.tta.filters`) against the moving average of the uploaded clips' probabilities.
    """

    def __init__(self, num_classes: int, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.e0 = losses.reliability_margin(num_classes, cfg.margin_factor)
        self.e_min = cfg.e_min * float(np.log(num_classes))
        self.redundancy = filters.redundancy_margin(
            cfg.redundancy_margin, cfg.margin_reference_classes, num_classes)
        self._num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.seen, self.entropy_sum = 0, 0.0
        self.warmup_mean: float | None = None
        self.probs_ema = np.zeros(self._num_classes, np.float32)
        self.has_ema = np.asarray(False)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "entropy_sum": self.entropy_sum,
                "warmup_mean": self.warmup_mean, "probs_ema": self.probs_ema,
                "has_ema": self.has_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.entropy_sum = int(state["seen"]), float(state["entropy_sum"])
        self.warmup_mean = None if state["warmup_mean"] is None else float(state["warmup_mean"])
        self.probs_ema = np.asarray(state["probs_ema"], np.float32)
        self.has_ema = np.asarray(state["has_ema"], bool)

    def e_max(self) -> float:
        if not self.cfg.dynamic_emax or self.warmup_mean is None:
            return self.e0
        return self.e0 * self.cfg.lam * (self.entropy_sum / self.seen) / self.warmup_mean

    def select(self, probs: np.ndarray, ent: np.ndarray, candidates: np.ndarray | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Which clips of this batch go up, and which clips each filter turned down (each
        judged on its own, so a clip can fail several); updates the running statistics.
        `candidates`: the clips that may go up at all (default every clip; the joint
        DMD + CEMA edge: the ones it offloads). The entropy statistics follow every clip,
        the redundancy average only the clips that went up."""
        self.seen += len(ent)
        self.entropy_sum += float(ent.sum())
        if self.warmup_mean is None and self.seen >= self.cfg.warmup_clips:
            self.warmup_mean = self.entropy_sum / self.seen
        failed = {name: np.zeros(len(ent), bool) for name in FILTERS}
        if self.cfg.unreliable_filter:
            failed["unreliable"] = ~np.asarray(filters.reliable(ent, self.e_max()))
        if self.cfg.low_info_filter:
            failed["low_info"] = ~(ent > self.e_min)
        if self.cfg.redundancy_filter:
            failed["redundant"] = ~np.asarray(filters.novel(
                probs, self.probs_ema, self.has_ema, self.redundancy))
        keep = ~np.any(list(failed.values()), axis=0)
        if candidates is not None:
            keep &= candidates
        ema, has = filters.update_probs_ema(self.probs_ema, self.has_ema, probs, keep,
                                            self.cfg.ema_decay)
        self.probs_ema, self.has_ema = np.asarray(ema), np.asarray(has)
        return keep, failed


class RandomUpload:
    """The control at matched upload (`random_upload`): a uniformly random share of the
    clips goes up instead of the ones CEMA's filters keep, so a study can ask whether the
    filters choose better than chance for the same bytes. Over the stream exactly
    `round(fraction * clips offered)` go up, so each batch sends its due (12 or 13 of 64
    at 0.2); the clips of a batch are drawn with a generator keyed by `(seed, clips offered
    before it)`, so a resumed stream draws the same ones."""

    def __init__(self, fraction: float, seed: int, upload_all: bool):
        if not 0.0 <= fraction <= 1.0:
            raise CloudConfigError(f"config.adapt.cema.random_upload={fraction} must be in "
                                   "[0, 1] (the share of clips uploaded at random; 0: off)")
        if fraction and upload_all:
            raise CloudConfigError("config.adapt.cema: random_upload and upload_all both choose "
                                   "what goes up; set one of them")
        self.fraction, self._seed, self.offered = float(fraction), seed, 0

    def choose(self, count: int, candidates: np.ndarray | None = None) -> np.ndarray:
        """The mask of this batch's `count` clips that go up (of `candidates`, default all)."""
        before, self.offered = self.offered, self.offered + count
        due = round(self.fraction * self.offered) - round(self.fraction * before)
        pool = np.arange(count) if candidates is None else np.flatnonzero(candidates)
        picks = np.random.default_rng([self._seed, before]).choice(
            pool, size=min(due, len(pool)), replace=False)
        keep = np.zeros(count, bool)
        keep[picks] = True
        return keep


class Edge:
    """The edge device: forward passes with the latest parameters from the cloud.

    With batch renormalisation its running statistics come from its first batch until
    the cloud sends its own; the edge itself never updates them. `seed` keys the random
    upload's draws (`RandomUpload`), when one is asked for."""

    def __init__(self, model: Adaptable, mesh, cfg: ml_collections.ConfigDict, seed: int = 0):
        self.model, self._mesh, self.renorm = model, mesh, cfg.batch_renorm
        self.filter = UploadFilter(model.num_classes, cfg)
        self.upload_all = cfg.upload_all
        self.random = RandomUpload(cfg.random_upload, seed, cfg.upload_all)
        self.upload_crf = int(cfg.upload_crf)
        if self.upload_crf:
            uploads.check_crf(self.upload_crf, "config.adapt.cema.upload_crf")
        self._constants = parallel.put_replicated(model.constants(), mesh)
        replicated, batch = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        self._forward = {
            mode: jax.jit(lambda params, stats, constants, clips, mode=mode: forward_outputs(
                model, params, stats, constants, clips, mode, self.renorm),
                in_shardings=(replicated, replicated, replicated, batch),
                out_shardings=((batch, batch), replicated))
            for mode in ("init", "use")}
        self.reset()

    def reset(self) -> None:
        self.norm_affine = parallel.put_replicated(self.model.source_norm_affine, self._mesh)
        self.stats = parallel.put_replicated(stats_template(self.model, self.renorm), self._mesh)
        self._stats_ready = not self.renorm
        self._stats_to_send = None  # the first batch's statistics, until they went up
        self.filter.reset()
        self.random.offered = 0

    def state_dict(self) -> dict[str, Any]:
        return {"norm_affine": parallel.fetch(self.norm_affine), "stats": parallel.fetch(self.stats),
                "stats_ready": self._stats_ready, "stats_to_send": self._stats_to_send,
                "filter": self.filter.state_dict(), "random_offered": self.random.offered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norm_affine = parallel.put_replicated(
            base.like(self.model.source_norm_affine, state["norm_affine"]), self._mesh)
        template = stats_template(self.model, self.renorm)
        self.stats = parallel.put_replicated(base.like(template, state["stats"]), self._mesh)
        self._stats_ready = bool(state["stats_ready"])
        self._stats_to_send = (None if state["stats_to_send"] is None
                               else base.like(template, state["stats_to_send"]))
        self.filter.load_state_dict(state["filter"])
        self.random.offered = int(state["random_offered"])

    def predict(self, clips: jax.Array) -> np.ndarray:
        return self.predict_outputs(clips)[0]

    def predict_outputs(self, clips: jax.Array) -> tuple[np.ndarray, jax.Array]:
        """`(logits on the host, features on the mesh)` with the latest parameters."""
        mode = "use" if self._stats_ready else "init"
        (logits, features), stats = self._forward[mode](self.norm_affine, self.stats,
                                                        self._constants, clips)
        if not self._stats_ready:
            self.stats, self._stats_ready = stats, True
            self._stats_to_send = parallel.fetch(stats)
        return parallel.fetch(logits), features

    def select(self, clips: jax.Array, logits: np.ndarray
               ) -> tuple[Upload, np.ndarray, dict[str, np.ndarray] | None]:
        """The upload for this batch, the mask of the clips in it and which clips each
        filter turned down (None when every clip goes up, unfiltered)."""
        keep, failed = self.choose(logits)
        if not keep.any():  # most batches: nothing leaves, so nothing is copied to the host
            return Upload(np.zeros((0, *clips.shape[1:]), clips.dtype)), keep, failed
        stored = np.asarray(parallel.fetch(clips))[keep]  # the clips as the edge stores them
        if self.upload_crf:
            decoded, sizes = uploads.encode_decode(stored, self.upload_crf)
            return self.package(decoded, int(sizes.sum())), keep, failed
        return self.package(stored), keep, failed

    def choose(self, logits: np.ndarray, candidates: np.ndarray | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Which clips go up (of `candidates`, default all) and which clips each filter
        turned down (None when every candidate goes up, unfiltered)."""
        if self.upload_all:
            keep = np.ones(len(logits), bool) if candidates is None else candidates.copy()
            return keep, None
        if self.random.fraction:
            return self.random.choose(len(logits), candidates), None
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        ent = np.asarray(losses.entropy(logits))
        return self.filter.select(probs, ent, candidates)

    def package(self, clips: np.ndarray, encoded_bytes: int | None = None) -> Upload:
        """These clips (as the cloud will see them: decoded if they travel encoded, of
        `encoded_bytes` then) as an upload, with the first batch's statistics if they have
        not gone up yet."""
        upload = Upload(clips, self._stats_to_send, encoded_bytes)
        self._stats_to_send = None
        return upload

    def receive(self, download: Download) -> None:
        self.norm_affine = parallel.put_replicated(download.norm_affine, self._mesh)
        if self.renorm:
            self.stats = parallel.put_replicated(download.stats, self._mesh)
            self._stats_ready = True


class ReplayBuffer:
    """The cloud's FIFO memory of uploaded clips (host memory, uint8)."""

    def __init__(self, capacity: int, seed: int):
        self.capacity, self._seed = capacity, seed
        self.reset()

    def reset(self) -> None:
        self._clips: list[np.ndarray] = []
        self._rng = np.random.default_rng(self._seed)

    def __len__(self) -> int:
        return len(self._clips)

    def add(self, clips: np.ndarray) -> None:
        self._clips.extend(clips)
        del self._clips[:max(0, len(self._clips) - self.capacity)]

    def state_dict(self) -> dict[str, Any]:
        return {"clips": _stacked(self._clips),
                "rng": json.dumps(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._clips = list(np.asarray(state["clips"]))
        self._rng.bit_generator.state = json.loads(state["rng"])

    def sample(self, count: int) -> np.ndarray:
        picks = self._rng.choice(len(self._clips), size=count, replace=False)
        return np.stack([self._clips[i] for i in picks])

    def latest(self, count: int) -> list[np.ndarray]:
        """The `count` most recent clips (fewer if it holds fewer); no randomness used."""
        return self._clips[len(self._clips) - min(count, len(self._clips)):]


class Cloud:
    """The cloud: replay buffer, foundation model, the edge's copy, optimisers, steps."""

    def __init__(self, edge_model: Adaptable, foundation: Adaptable, mesh,
                 cfg: ml_collections.ConfigDict, seed: int):
        if foundation.model.class_names != edge_model.model.class_names:
            raise CloudConfigError("CEMA's foundation (cloud) and edge models must predict the same "
                            "classes; train or convert the cloud for the edge's dataset")
        if int(cfg.min_cloud_steps) != cfg.min_cloud_steps or cfg.min_cloud_steps < 0:
            raise CloudConfigError(
                f"config.adapt.cema.min_cloud_steps={cfg.min_cloud_steps} must be a whole "
                "number >= 0 (the cloud's steps per received upload, at least; 1: the authors')")
        if cfg.replay_from < cfg.new_per_step + cfg.replay_per_step:
            raise CloudConfigError(
                f"config.adapt.cema.replay_from={cfg.replay_from} must be at least "
                f"new_per_step + replay_per_step = {cfg.new_per_step + cfg.replay_per_step}: "
                "a replay-only step samples that many clips from the buffer")
        self.edge_model, self.foundation, self.cfg = edge_model, foundation, cfg
        self._mesh = parallel.submesh_dividing(
            mesh, cfg.new_per_step, cfg.replay_per_step, cfg.new_per_step + cfg.replay_per_step)
        self.e0 = losses.reliability_margin(edge_model.num_classes, cfg.margin_factor)
        self.buffer = ReplayBuffer(cfg.buffer_size, seed)
        self.edge_opt = optax.sgd(cfg.edge_learning_rate, momentum=cfg.momentum)
        self.foundation_opt = optax.sgd(cfg.foundation_learning_rate, momentum=cfg.momentum)
        self._const = parallel.put_replicated(
            {"edge": edge_model.constants(), "foundation": foundation.constants()}, self._mesh)
        replicated = parallel.replicated(self._mesh)  # the clips arrive sharded along `data`
        self._step = jax.jit(self._adapt, donate_argnums=0,
                             out_shardings=(replicated, replicated))
        self._initial_stats = jax.jit(self._initial_stats_of, out_shardings=replicated)
        self._classify = jax.jit(lambda state, const, clips: forward(
            self.foundation, state["foundation"], state["foundation_stats"], const["foundation"],
            clips, "use", cfg.batch_renorm)[0])
        self.reset()

    def spawn(self, seed: int) -> "Cloud":
        """Another edge's cloud: the same models, constants and compiled steps (a server
        compiles once for every edge), its own state, optimisers and replay buffer."""
        other = copy.copy(self)
        other.buffer = ReplayBuffer(self.cfg.buffer_size, seed)
        other.reset()
        return other

    def warm_up(self, clip_shape: tuple[int, ...]) -> None:
        """Runs each kind of step once on blank clips (new clips only, new and replayed,
        replayed only), so that no edge waits for a compilation; then resets."""
        cfg = self.cfg
        blank = np.zeros((cfg.new_per_step + cfg.replay_from, *clip_shape), np.uint8)
        self.receive(Upload(blank[:cfg.new_per_step]))  # the buffer below replay_from
        self.receive(Upload(blank[cfg.new_per_step:]))  # now above it: new and replayed
        self.receive(Upload(blank[:0]))  # nothing new: replayed only
        self.reset()

    def reset(self) -> None:
        edge, foundation = self.edge_model.source_norm_affine, self.foundation.source_norm_affine
        self._edge_stats_from_edge = None
        self.state = parallel.put_replicated({
            "edge": edge, "edge_opt": self.edge_opt.init(edge),
            "edge_stats": stats_template(self.edge_model, self.cfg.batch_renorm),
            "foundation": foundation, "foundation_opt": self.foundation_opt.init(foundation),
            "foundation_stats": stats_template(self.foundation, self.cfg.batch_renorm),
        }, self._mesh)
        self._stats_ready = not self.cfg.batch_renorm
        self.buffer.reset()
        self._pending: list[np.ndarray] = []
        self.replay_only_steps = 0  # since the reset

    def state_dict(self) -> dict[str, Any]:
        return {"state": parallel.fetch(self.state), "stats_ready": self._stats_ready,
                "edge_stats_from_edge": self._edge_stats_from_edge,
                "buffer": self.buffer.state_dict(), "pending": _stacked(self._pending),
                "replay_only_steps": self.replay_only_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = parallel.put_replicated(base.like(self.state, state["state"]), self._mesh)
        self._stats_ready = bool(state["stats_ready"])
        stats = state["edge_stats_from_edge"]
        self._edge_stats_from_edge = (
            None if stats is None
            else base.like(stats_template(self.edge_model, self.cfg.batch_renorm), stats))
        self.buffer.load_state_dict(state["buffer"])
        self._pending = list(np.asarray(state["pending"]))
        self.replay_only_steps = int(state["replay_only_steps"])

    def receive(self, upload: Upload) -> tuple[Download | None, list[float]]:
        """Stores the clips, runs the steps they allow; returns the new edge parameters
        (None if no step ran) and the edge loss of each step."""
        cfg = self.cfg
        if upload.stats is not None:  # the edge's statistics: where its copy here starts
            self._edge_stats_from_edge = upload.stats
        self.buffer.add(upload.clips)
        self._pending.extend(upload.clips)
        step_losses = []
        while len(self._pending) >= cfg.new_per_step:
            new = np.stack(self._pending[:cfg.new_per_step])
            del self._pending[:cfg.new_per_step]
            replay = (self.buffer.sample(cfg.replay_per_step)
                      if len(self.buffer) >= cfg.replay_from else None)
            step_losses.append(self._run_step(new, replay))
        # Replay-only steps up to min_cloud_steps once the buffer holds *more* than
        # replay_from clips (the authors': one when nothing new arrived, at their
        # `len(history_buffer) > 256`; the mixed step above needs as many).
        while len(step_losses) < cfg.min_cloud_steps and len(self.buffer) > cfg.replay_from:
            step_losses.append(self._run_step(
                None, self.buffer.sample(cfg.new_per_step + cfg.replay_per_step)))
            self.replay_only_steps += 1
        if not step_losses:
            return None, []
        sent = parallel.fetch({"norm_affine": self.state["edge"],
                               "stats": self.state["edge_stats"] if self.cfg.batch_renorm else None})
        return Download(**sent), step_losses

    def classify(self, clips: np.ndarray, batch: int) -> np.ndarray:
        """The adapted foundation model's logits for `clips`, run `batch` at a time, each
        forward filled up with the buffer's latest clips (then repeats): a BatchNorm
        cloud normalises a few offloaded clips with the statistics of recent traffic, and
        one shape is compiled."""
        out = []
        for start in range(0, len(clips), batch):
            chunk = clips[start:start + batch]
            fill = [*chunk, *self.buffer.latest(batch - len(chunk))]
            fill += [chunk[i % len(chunk)] for i in range(batch - len(fill))]
            logits = self._classify(self.state, self._const,
                                    parallel.put_rows(np.stack(fill), self._mesh))
            out.append(np.asarray(parallel.fetch(logits))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.foundation.num_classes),
                                                        np.float32)

    def _run_step(self, new: np.ndarray | None, replay: np.ndarray | None) -> float:
        # Every host holds every uploaded clip: each puts its devices' rows.
        to_mesh = lambda clips: None if clips is None else parallel.put_rows(clips, self._mesh)
        new, replay = to_mesh(new), to_mesh(replay)
        if not self._stats_ready:  # renormalisation: where the running statistics start
            self.state.update(self._initial_stats(self.state, self._const, new, replay))
            if self._edge_stats_from_edge is not None:  # the edge's own, as it began
                self.state["edge_stats"] = parallel.put_replicated(self._edge_stats_from_edge,
                                                                   self._mesh)
            self._stats_ready = True
        self.state, loss = self._step(self.state, self._const, new, replay)
        return float(loss)

    def _initial_stats_of(self, state: dict[str, Any], const: dict[str, Any],
                          new: jax.Array | None, replay: jax.Array | None) -> dict[str, Any]:
        """Running statistics of both models set from the first step's clips (the edge
        copy's are then replaced by the edge's own first batch's, as in the authors' code,
        where edge and cloud share one model whose statistics the edge's first batch set)."""
        clips = jnp.concatenate([c for c in (new, replay) if c is not None])
        _, edge = forward(self.edge_model, state["edge"], state["edge_stats"], const["edge"],
                          clips, "init", True)
        _, foundation = forward(self.foundation, state["foundation"], state["foundation_stats"],
                                const["foundation"], new if new is not None else clips, "init", True)
        return {"edge_stats": edge, "foundation_stats": foundation}

    def _adapt(self, state: dict[str, Any], const: dict[str, Any], new: jax.Array | None,
               replay: jax.Array | None) -> tuple[dict[str, Any], jax.Array]:
        """One cloud step, as the official CEMA code does it: the foundation model learns
        from the new clips by weighted entropy (L_f; a replay-only step leaves it alone),
        then the edge copy learns on new + replayed clips by weighted entropy plus
        distillation from the *updated* foundation model's predictions (L_e)."""
        cfg = self.cfg
        state = dict(state)
        run = lambda model, which, params, clips, mode: forward(
            model, params, state[f"{which}_stats"], const[which], clips, mode, cfg.batch_renorm)
        if new is not None:
            def foundation_loss(params):
                logits, stats = run(self.foundation, "foundation", params, new, "update")
                ent = losses.entropy(logits)
                return jnp.mean(losses.reliability_weight(ent, self.e0) * ent), stats

            (_, f_stats), f_grads = jax.value_and_grad(foundation_loss, has_aux=True)(
                state["foundation"])
            f_updates, state["foundation_opt"] = self.foundation_opt.update(
                f_grads, state["foundation_opt"], state["foundation"])
            state["foundation"] = optax.apply_updates(state["foundation"], f_updates)
            state["foundation_stats"] = f_stats

        clips = jnp.concatenate([c for c in (new, replay) if c is not None])
        f_logits, _ = run(self.foundation, "foundation", state["foundation"], clips, "use")
        f_logits = jax.lax.stop_gradient(f_logits)
        w_f = losses.reliability_weight(losses.entropy(f_logits), self.e0)

        def edge_loss(params):
            logits, stats = run(self.edge_model, "edge", params, clips, "update")
            ent = losses.entropy(logits)
            kl, ce = losses.distillation(logits, f_logits, cfg.temperature)
            return (cfg.alpha * jnp.mean(losses.reliability_weight(ent, self.e0) * ent)
                    + cfg.beta * jnp.mean(w_f * kl) + cfg.gamma * jnp.mean(w_f * ce)), stats

        (e_loss, e_stats), e_grads = jax.value_and_grad(edge_loss, has_aux=True)(state["edge"])
        e_updates, state["edge_opt"] = self.edge_opt.update(e_grads, state["edge_opt"],
                                                            state["edge"])
        state["edge"] = optax.apply_updates(state["edge"], e_updates)
        state["edge_stats"] = e_stats
        return state, e_loss


# config.adapt.cema: what the edge reads (its filters and its upload), then the cloud.
EDGE_SETTINGS = (
    "margin_factor", "unreliable_filter", "dynamic_emax", "warmup_clips", "lam",
    "low_info_filter", "e_min", "redundancy_filter", "redundancy_margin",
    "margin_reference_classes", "ema_decay", "upload_all", "random_upload", "upload_crf",
    "batch_renorm")
# Over the link (the link job) the uploads' encoding is the link's and the edge sends no
# running statistics: batch renormalisation stays in the adapt job.
LINK_EDGE_SETTINGS = tuple(k for k in EDGE_SETTINGS if k not in ("upload_crf", "batch_renorm"))
SETTINGS = EDGE_SETTINGS + (
    "buffer_size", "new_per_step", "replay_per_step", "replay_from", "foundation_learning_rate",
    "edge_learning_rate", "momentum", "alpha", "beta", "gamma", "temperature", "min_cloud_steps")


class Downlink:
    """Downloads on their way to the edge: each arrives `delay` batches after the batch
    whose upload produced it (0: before the next batch, as the paper's simulation has
    it), so a study can ask what parameters that come k batches late are worth. Each
    carries the loss of the cloud steps behind it: the loss of an update is reported
    (and checked for being finite) when the update reaches the edge."""

    def __init__(self, delay: int):
        if delay < 0:
            raise CloudConfigError(f"config.adapt.cema.download_delay={delay} must be >= 0 "
                                   "(batches between a cloud step and the edge using it)")
        self.delay = delay
        self.reset()

    def reset(self) -> None:
        self.batch = 0
        # (the batch it arrives after, the download, its steps' mean loss)
        self._in_flight: list[tuple[int, Download, float]] = []

    def after_batch(self, download: Download | None, loss: float) -> tuple[list[Download], float]:
        """Sends this batch's download (if any); the downloads that arrive now (oldest
        first) and their steps' mean loss (nan if none arrives)."""
        if download is not None:
            self._in_flight.append((self.batch + self.delay, download, loss))
        arrived = [item for item in self._in_flight if item[0] <= self.batch]
        self._in_flight = [item for item in self._in_flight if item[0] > self.batch]
        self.batch += 1
        losses_ = [item[2] for item in arrived]
        return [item[1] for item in arrived], float(np.mean(losses_)) if losses_ else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch,
                "due": np.asarray([item[0] for item in self._in_flight], np.int64),
                "loss": np.asarray([item[2] for item in self._in_flight], np.float64),
                "in_flight": {str(i): dataclasses.asdict(item[1])
                              for i, item in enumerate(self._in_flight)}}

    def load_state_dict(self, state: dict[str, Any], template: Download) -> None:
        self.batch = int(state["batch"])
        downloads = [Download(base.like(template.norm_affine, d["norm_affine"]),
                              None if d["stats"] is None else base.like(template.stats, d["stats"]))
                     for _, d in sorted(state["in_flight"].items(), key=lambda kv: int(kv[0]))]
        due = np.asarray(state["due"]).ravel().astype(int)
        loss = np.asarray(state["loss"]).ravel().astype(float)
        self._in_flight = list(zip(due.tolist(), downloads, loss.tolist()))


class Method:
    """One edge and one cloud on a stream: predict, upload, adapt, download."""

    SETTINGS = SETTINGS + ("download_delay",)

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        self.name = context.name
        self.edge = Edge(edge, context.mesh, cfg, context.seed)
        self.cloud = Cloud(edge, context.foundation(), context.mesh, cfg, context.seed)
        self.downlink = Downlink(int(cfg.download_delay))

    def reset(self) -> None:
        self.edge.reset()
        self.cloud.reset()
        self.downlink.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"edge": self.edge.state_dict(), "cloud": self.cloud.state_dict(),
                "downlink": self.downlink.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.edge.load_state_dict(state["edge"])
        self.cloud.load_state_dict(state["cloud"])
        self.downlink.load_state_dict(state["downlink"], download_template(self.edge))

    def process(self, clips: jax.Array) -> BatchResult:
        logits = self.edge.predict(clips)
        e_max = self.edge.filter.e_max()  # the threshold this batch was filtered with
        upload, uploaded, failed = self.edge.select(clips, logits)
        replay_only_before = self.cloud.replay_only_steps
        download, step_losses = self.cloud.receive(upload)
        arrived, loss = self.downlink.after_batch(download, _mean(step_losses))
        for parameters in arrived:
            self.edge.receive(parameters)
        return BatchResult(
            logits, learned_from=uploaded, uploaded=uploaded, loss=loss, updated=bool(arrived), bytes_up=upload.nbytes,
            bytes_down=download.nbytes if download is not None else 0,
            cloud_steps=len(step_losses), filter_failed=failed,
            metrics={"e_max": e_max, "buffer": len(self.cloud.buffer),
                     "replay_only_steps": self.cloud.replay_only_steps - replay_only_before})


def download_template(edge: Edge) -> Download:
    """A download's structure for this edge (what restoring one in flight needs)."""
    return Download(edge.model.source_norm_affine,
                    stats_template(edge.model, True) if edge.renorm else None)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _stacked(clips: list[np.ndarray]) -> np.ndarray:
    """A list of equally shaped uint8 clips as one array (an empty one as shape (0,))."""
    return np.stack(clips) if clips else np.zeros((0,), np.uint8)
