"""The `train` job: supervised training of a video classifier (the edge or a teacher).

One jitted step over the `data` mesh: the batch is sharded, parameters and optimiser
state replicated; XLA adds the gradient all-reduce and computes BatchNorm statistics
over the whole global batch. The step's randomness is `fold_in(seed, step)` and the
data is a pure function of the step (see `data.pipeline`), so a run resumed from any
checkpoint finishes bit-identical to one that never stopped.

The architecture is `config.model`, or the model directory `train.init_from` fine-tunes
(then `config.model` may only repeat its fields: a field that differs is an error, not a
silent second preset). How it runs (dtype, kernels) is `config.runtime`.

Writes to the workdir: `stamp.json` (what the results there are made from: a rerun with
other settings stops, see `stamps`), `checkpoints/`, the final model in `model/` (the
format every job loads, see `model_store`), TensorBoard events, `config.json`,
`parameters.txt`, `predictions.npz` (per-clip logits on the eval split) and
`summary.json` (`eval_accuracy`, `steps`, `examples_per_sec`, `param_fingerprint`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics

from dmd_jax import checkpoint, files, jobs, model_store, models, parallel, reporting, stamps
from dmd_jax.data import loader, pipeline, views
from dmd_jax.errors import ConfigValueError, NonFiniteLossError, UserError, check_positive

# This job's computation version (`stamps.make`): bump it when its results would change
# for the same settings and inputs, so that results made by older code are not reused.
STAMP_VERSION = 1
SECTIONS = ("data", "model", "train", "runtime")
KEYS = {"train": ("split", "batch_size", "steps", "optimizer", "learning_rate", "warmup_steps",
                  "schedule", "decay_fraction", "weight_decay", "momentum", "label_smoothing",
                  "log_every", "eval_every", "eval_split", "eval_batch_size", "checkpoint_every",
                  "keep_checkpoints", "init_from")}
# Train settings that change what is logged or kept, not the trained model.
_BOOKKEEPING = ("log_every", "eval_every", "eval_split", "eval_batch_size",
                "checkpoint_every", "keep_checkpoints", "init_from")


class ModelConflictError(UserError, ValueError):
    """`config.model` contradicts the model that `train.init_from` fine-tunes."""


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any


# Built with `create`, not class annotations: those are strings under
# `from __future__ import annotations`, which clu cannot read.
TrainMetrics = metrics.Collection.create(
    loss=metrics.Average.from_output("loss"),
    accuracy=metrics.Average.from_output("accuracy"),
    grad_norm=metrics.Average.from_output("grad_norm"),
    # Whether every parameter and optimiser value after the step is finite: a checkpoint
    # is only written of a state that is (the loss alone is computed before the update).
    state_finite=metrics.LastValue.from_output("state_finite"))


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up, then either cosine decay over the rest ('cosine') or a constant
    rate with a cosine decay over the last `decay_fraction` of the steps ('wsd',
    warmup-stable-decay). Short runs learn more under 'wsd': the rate stays at its peak
    while the model is still far from a solution instead of decaying through it."""
    steps = max(train.steps, train.warmup_steps + 1)
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, train.learning_rate,
                                                  train.warmup_steps, steps)
    if train.schedule == "wsd":
        decay = max(1, min(steps - train.warmup_steps, round(train.decay_fraction * steps)))
        stable = steps - train.warmup_steps - decay
        return optax.join_schedules(
            [optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps),
             optax.constant_schedule(train.learning_rate),
             optax.cosine_decay_schedule(train.learning_rate, decay)],
            boundaries=[train.warmup_steps, train.warmup_steps + stable])
    raise ConfigValueError(f"unknown config.train.schedule {train.schedule!r}; use 'cosine' or "
                           "'wsd'")


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW or SGD with momentum, on `make_schedule`'s learning rates."""
    schedule = make_schedule(train)
    if train.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(train.weight_decay),
                           optax.sgd(schedule, momentum=train.momentum))
    raise ConfigValueError(f"unknown config.train.optimizer {train.optimizer!r}; use 'adamw' or "
                           "'sgd'")


def init_state(model, tx, clip_shape: tuple[int, ...], seed: int) -> TrainState:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *clip_shape), jnp.float32))
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]))


def start_from(state: TrainState, pretrained: dict[str, Any]) -> tuple[TrainState, list[str]]:
    """`state` with every parameter and statistic that `pretrained` has in the same shape;
    the rest (a classifier for other classes) keeps its fresh initialisation. Returns the
    new state and the names of the freshly initialised leaves."""
    flat = {jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    fresh: list[str] = []

    def pick(collection):
        def leaf(path, init):
            name = f"['{collection}']" + jax.tree_util.keystr(path)
            if name in flat and np.shape(flat[name]) == np.shape(init):
                return jnp.asarray(flat[name], init.dtype)
            fresh.append(name)
            return init
        return leaf

    params = jax.tree_util.tree_map_with_path(pick("params"), state.params)
    batch_stats = jax.tree_util.tree_map_with_path(pick("batch_stats"), state.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats), fresh


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], *, model, tx,
               label_smoothing: float, seed: int,
               stats: tuple = (pipeline.MEAN, pipeline.STD)) -> tuple[TrainState, metrics.Collection]:
    """One optimiser step on a (global) batch; pure, so jit may shard it however.

    `stats`: the input normalisation (mean, std) of the model family."""
    dropout_key = jax.random.fold_in(jax.random.key(seed + 1), state.step)
    x = pipeline.normalize(batch["video"], *stats)
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], model.num_classes),
                                  label_smoothing)

    def loss_fn(params):
        (logits, _), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        return optax.softmax_cross_entropy(logits, targets).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                              batch_stats=updates.get("batch_stats", state.batch_stats),
                              opt_state=opt_state)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
        (new_state.params, new_state.batch_stats, new_state.opt_state))
        if jnp.issubdtype(x.dtype, jnp.inexact)]))
    return new_state, TrainMetrics.single_from_model_output(
        loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        grad_norm=optax.global_norm(grads), state_finite=finite.astype(jnp.float32))


def eval_logits(state: TrainState, video: jnp.ndarray, *, model,
                stats: tuple = (pipeline.MEAN, pipeline.STD)) -> jnp.ndarray:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return views.average_over_views(
        lambda clips: model.apply(variables, pipeline.normalize(clips, *stats), train=False)[0],
        video)


def evaluate(eval_fn, state: TrainState, split: pipeline.Split, batch_size: int,
             mesh, workers: int = 0) -> dict[str, np.ndarray]:
    """Logits for every clip of `split`, in order (padding rows dropped), averaged over
    the clip's evaluation views."""
    rows = parallel.host_slice(batch_size)
    logits, labels, ids = [], [], []
    for batch in loader.eval_batches(split, batch_size, rows, workers=workers):
        # Only the clips go to the devices; labels, ids and the mask stay on the host.
        video = parallel.to_global(batch["video"], mesh)
        batch_logits = parallel.fetch(eval_fn(state, video))
        host = parallel.gather_host_rows({k: batch[k] for k in ("label", "id", "mask")})
        keep = host["mask"].astype(bool)
        logits.append(batch_logits[keep])
        labels.append(host["label"][keep])
        ids.append(host["id"][keep])
    return {"logits": np.concatenate(logits), "label": np.concatenate(labels),
            "id": np.concatenate(ids)}


@jobs.entry("train", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.train
    check_positive(cfg, ("batch_size", "eval_batch_size", "steps", "log_every", "eval_every",
                         "checkpoint_every", "keep_checkpoints"), "config.train")
    make_optimizer(cfg)  # an unknown optimizer or schedule stops here, before any work
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)
    parallel.check_global_batch(cfg.eval_batch_size, mesh)

    builder = pipeline.prepare(config.data)
    train_split = pipeline.open_split(builder, config.data, cfg.get("split", "train"))
    eval_split = pipeline.open_split(builder, config.data, cfg.eval_split)
    model_config, pretrained = architecture(config)
    model = models.build(model_config, train_split.num_classes, config.runtime)
    tx = make_optimizer(cfg)
    clip_shape = (config.data.frames, config.data.size, config.data.size, 3)
    stamp = stamps.make(
        {"model": models.architecture(model_config),
         "train": {k: v for k, v in cfg.items() if k not in _BOOKKEEPING},
         "runtime": config.runtime, "seed": config.seed,
         "data": pipeline.dataset_identity(builder, config.data)},
        {"init_from": pretrained.fingerprint} if pretrained else {}, STAMP_VERSION)
    ckpt_dir = files.path(workdir) / "checkpoints"
    stamps.claim(workdir, stamp, "training results", config.get("overwrite", False),
                 has_results=ckpt_dir.exists() and any(ckpt_dir.iterdir()),
                 clear=lambda: _clear(workdir))
    files.write_json(files.path(workdir) / "config.json", config.to_dict())

    repl = parallel.replicated(mesh)
    state = jax.jit(functools.partial(init_state, model, tx, clip_shape, config.seed),
                    out_shardings=repl)()
    if pretrained is not None:
        state, fresh = start_from(state, pretrained.variables)
        state = parallel.put_replicated(state, mesh)
        reporting.log(f"[train] initialised from {cfg.init_from} ({pretrained.source}); "
                      f"freshly initialised: {fresh or 'nothing'}")
    reporting.log(f"[train] {reporting.parameter_summary(state.params, workdir)}")
    reporting.log(f"[train] mesh {dict(mesh.shape)} on {parallel.describe()}; global batch "
                  f"{cfg.batch_size}; {len(train_split)} training clips, "
                  f"{train_split.num_classes} classes")

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
    data_seed = config.data.seed + config.seed
    state, start_step = _maybe_resume(ckpt, state)

    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, label_smoothing=cfg.label_smoothing,
                          seed=config.seed, stats=models.input_stats(model_config)),
        in_shardings=(repl, parallel.batch_sharded(mesh)), out_shardings=(repl, repl),
        donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_logits, model=model,
                                        stats=models.input_stats(model_config)),
                      in_shardings=(repl, parallel.batch_sharded(mesh)),
                      out_shardings=parallel.batch_sharded(mesh))

    writer = reporting.MetricWriter(workdir)
    progress = reporting.Progress(cfg.steps, start_step, cfg.batch_size)
    workers = int(config.data.get("workers", 0))
    batches = loader.train_batches(train_split, cfg.batch_size, start_step, cfg.steps,
                                   data_seed, parallel.host_slice(cfg.batch_size), workers)
    compile_seconds, window = None, None
    for step in range(start_step + 1, cfg.steps + 1):
        batch = parallel.to_global(next(batches), mesh)
        t0 = time.perf_counter()
        state, step_metrics = step_fn(state, batch)
        window = step_metrics if window is None else window.merge(step_metrics)
        if compile_seconds is None:
            jax.block_until_ready(state)
            compile_seconds = time.perf_counter() - t0
            reporting.log(f"[train] first step (compile + run) took {compile_seconds:.1f}s")
            progress.restart_clock(step)

        is_last = step == cfg.steps
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or is_last:
            values = _check_finite(window.compute(), step, ckpt, cfg.learning_rate)
            window = None
            writer.scalars(step, {f"train/{k}": v for k, v in values.items()})
            reporting.log(progress.line(step, values))
        if step % cfg.eval_every == 0 and not is_last:
            accuracy = _accuracy(evaluate(eval_fn, state, eval_split, cfg.eval_batch_size, mesh,
                                          workers))
            writer.scalars(step, {f"eval/{cfg.eval_split}_accuracy": accuracy})
            reporting.log(f"[eval] step {step}  {cfg.eval_split} accuracy {accuracy:.4f}")
            progress.restart_clock(step)  # throughput counts training steps only
        if step % cfg.checkpoint_every == 0 or is_last:
            ckpt.save(step, state, {"examples_seen": step * cfg.batch_size})
    ckpt.wait()

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    model_store.save(os.path.join(workdir, "model"), model_config, train_split.class_names,
                     variables, clip_shape, source=f"dmd_jax train job, step {cfg.steps}")
    predictions = evaluate(eval_fn, state, eval_split, cfg.eval_batch_size, mesh, workers)
    files.save_npz(os.path.join(workdir, "predictions.npz"), **predictions)
    summary = {
        "eval_accuracy": _accuracy(predictions),
        "eval_split": cfg.eval_split,
        "train_split": train_split.name,
        "num_train_clips": len(train_split),
        "skipped_videos": len(pipeline.skipped_videos(builder)),  # undecodable, left out
        "steps": int(state.step),
        "examples_per_sec": progress.examples_per_sec,
        "compile_seconds": compile_seconds,
        "param_fingerprint": reporting.fingerprint(variables),
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
        "devices": parallel.describe(),
    }
    if start_step == cfg.steps:  # nothing trained now: keep the throughput of the real run
        summary.update(_previous_throughput(workdir))
    writer.scalars(cfg.steps, {f"eval/{cfg.eval_split}_accuracy": summary["eval_accuracy"]})
    writer.close()
    ckpt.close()
    files.write_json(os.path.join(workdir, "summary.json"), summary)
    reporting.log(f"[train] done: {cfg.eval_split} accuracy {summary['eval_accuracy']:.4f}, "
                  f"{summary['examples_per_sec']:.0f} clips/s, fingerprint "
                  f"{summary['param_fingerprint']}")
    return summary


def architecture(config: ml_collections.ConfigDict
                 ) -> tuple[ml_collections.ConfigDict, model_store.LoadedModel | None]:
    """`(model config, pretrained model or None)`: `config.model`, or the architecture of
    `train.init_from`, which `config.model` may repeat but not contradict."""
    if not config.train.init_from:
        if "name" not in config.model:
            raise UserError("config.model is empty and config.train.init_from is not set: "
                            "give the architecture, or a model directory to fine-tune")
        return config.model, None
    pretrained = model_store.load(config.train.init_from,
                                  role="initialisation (train.init_from)",
                                  runtime=config.runtime)
    conflicts = [f"{k}={v!r} (the model has {pretrained.model_config.get(k)!r})"
                 for k, v in config.model.items()
                 if pretrained.model_config.get(k, object()) != v]
    if conflicts:
        raise ModelConflictError(
            f"config.train.init_from={config.train.init_from!r} brings its architecture, but "
            f"config.model sets {', '.join(conflicts)}; leave config.model empty (or equal to "
            "the pretrained model's) when fine-tuning")
    return pretrained.model_config, pretrained


def _clear(workdir: str) -> None:
    """What a stale training run left: checkpoints, the export, its results."""
    for name in ("checkpoints", "model"):
        files.remove_tree(files.path(workdir) / name)
    for name in ("predictions.npz", "summary.json"):
        files.remove(files.path(workdir) / name)


def _maybe_resume(ckpt: checkpoint.Checkpointer, state: TrainState) -> tuple[TrainState, int]:
    """The newest readable checkpoint, if any (the workdir's stamp proved it was made with
    these settings)."""
    restored = ckpt.restore_latest(state)
    if restored is None:
        return state, 0
    state, meta = restored
    reporting.log(f"[train] resumed from checkpoint step {meta['step']}")
    return state, int(meta["step"])


def _check_finite(values: dict[str, Any], step: int, ckpt: checkpoint.Checkpointer,
                  learning_rate: float) -> dict[str, float]:
    """Stops at the first non-finite loss, gradient or state, before anything diverged is
    saved: every checkpoint kept holds a finite state."""
    values = {k: float(v) for k, v in values.items()}
    finite = values.pop("state_finite") == 1.0
    if not (finite and np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
        ckpt.wait()
        last = ckpt.steps()
        kept = (f"the last checkpoint, step {last[-1]}, holds a finite state (each is checked "
                "before it is saved)" if last else "no checkpoint was written")
        raise NonFiniteLossError(
            f"training diverged by step {step} (loss {values['loss']}, gradient norm "
            f"{values['grad_norm']}, parameters {'finite' if finite else 'not finite'}); "
            f"nothing of the diverged run was saved and {kept}. Lower "
            f"config.train.learning_rate (now {learning_rate}) in a fresh --workdir, or check "
            "the input data.")
    return values


def _previous_throughput(workdir: str) -> dict[str, Any]:
    try:
        previous = files.read_json(files.path(workdir) / "summary.json")
    except (OSError, UserError):
        return {}
    return {k: previous[k] for k in ("examples_per_sec", "compile_seconds") if k in previous}


def _accuracy(predictions: dict[str, np.ndarray]) -> float:
    return float(np.mean(np.argmax(predictions["logits"], -1) == predictions["label"]))
