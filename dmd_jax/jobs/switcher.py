"""The `train_switcher` job: fit the switcher to the label job's targets.

For each target in `config.switcher.targets` (the first is the switcher the hybrid system
uses, `hard` by default; `ground_truth` trains the ablation router) it trains a
`routers.switcher.Switcher` on the labelled pool with binary cross-entropy (optionally
class-balanced), one jitted step over the `data` mesh like the `train` job, checkpoints
and resume included, then scores the held-out split. Output per target:
`WORKDIR/<target>/` with its `stamp.json` (the settings and the labels it learnt from:
a rerun with others stops), `checkpoints/`, the final `switcher/` export (which the
`switcher:<target>` router loads) and `predictions.npz`; top-level `summary.json` with
`switcher_auroc` (of the first target: how well `P(aligned)` ranks the held-out clips by
that target).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics

from dmd_jax import checkpoint, files, jobs, parallel, reporting, routing, stamps
from dmd_jax.data import labels, pipeline
from dmd_jax.errors import NonFiniteLossError, UserError, check_positive
from dmd_jax.routers import switcher as switcher_lib
from dmd_jax.routers.switcher import Switcher

SECTIONS = ("switcher",)
KEYS = {"switcher": ("label_dir", "targets", "train_split", "eval_split", "hidden",
                     "dropout_rate", "steps", "batch_size", "learning_rate", "weight_decay",
                     "class_balance", "log_every", "checkpoint_every")}
# Switcher settings that change what is logged or kept, or where it comes from.
_BOOKKEEPING = ("log_every", "checkpoint_every", "label_dir", "eval_split", "targets")


@flax.struct.dataclass
class SwitcherState:
    step: jnp.ndarray
    params: Any
    opt_state: Any


SwitcherMetrics = metrics.Collection.create(
    loss=metrics.Average.from_output("loss"),
    accuracy=metrics.Average.from_output("accuracy"))


@jobs.entry("train_switcher", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.switcher
    check_positive(cfg, ("steps", "batch_size", "log_every", "checkpoint_every"), "config.switcher")
    unknown = [t for t in cfg.targets if t not in labels.TARGETS]
    if unknown or not cfg.targets:
        raise UserError(f"config.switcher.targets={tuple(cfg.targets)}: each must be one of "
                        f"{labels.TARGETS}")
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)
    train_data = labels.read_split(cfg.label_dir, cfg.train_split)
    eval_data = labels.read_split(cfg.label_dir, cfg.eval_split)
    label_identity = labels.stamp_digest(cfg.label_dir)

    summary: dict[str, Any] = {"targets": {}, "train_split": cfg.train_split,
                               "eval_split": cfg.eval_split}
    if "relaxed" in cfg.targets:  # t from the calibration (eval) split, as Hybrid LLM
        t = labels.balanced_relaxation(eval_data)
        for data in (train_data, eval_data):
            data["relaxed"] = labels.relaxed_targets(data, t)
        summary["relaxation"] = t
        reporting.log(f"[switcher:relaxed] t = {t:.4f} balances the {cfg.eval_split} labels "
                      f"({np.mean(eval_data['relaxed']):.1%} positive; hard agreement "
                      f"{np.mean(eval_data['hard']):.1%})")
    stamped = {}
    for target in cfg.targets:  # every target checked before anything is written
        if target == "ground_truth" and np.any(train_data["ground_truth"] < 0):
            raise UserError(f"target 'ground_truth' needs labels, but split "
                            f"{cfg.train_split!r} has unlabelled clips; drop it from "
                            "config.switcher.targets")
        stamped[target] = stamps.make(
            {"switcher": {k: v for k, v in cfg.items() if k not in _BOOKKEEPING},
             "seed": config.seed, "target": target}, {"labels": label_identity})
        out_dir = os.path.join(workdir, target)
        ckpt_dir = files.path(out_dir) / "checkpoints"
        stamps.check(stamps.read(files.path(out_dir) / stamps.STAMP_FILE), stamped[target],
                     f"{target!r} switcher", out_dir, config.get("overwrite", False),
                     has_results=ckpt_dir.exists() and any(ckpt_dir.iterdir()))
    files.write_json(files.path(workdir) / "config.json", config.to_dict())
    for target, stamp in stamped.items():
        out_dir = os.path.join(workdir, target)
        ckpt_dir = files.path(out_dir) / "checkpoints"
        stamps.claim(out_dir, stamp, f"{target!r} switcher", config.get("overwrite", False),
                     has_results=ckpt_dir.exists() and any(ckpt_dir.iterdir()),
                     clear=lambda d=out_dir: _clear(d))
        summary["targets"][target] = _train_one(config, target, train_data, eval_data, mesh,
                                                out_dir, stamp)
    first = summary["targets"][cfg.targets[0]]
    summary.update(switcher_auroc=first["auroc"], target=cfg.targets[0])
    files.write_json(files.path(workdir) / "summary.json", summary)
    return summary


def _clear(out_dir: str) -> None:
    for name in ("checkpoints", "switcher"):
        files.remove_tree(files.path(out_dir) / name)
    files.remove(files.path(out_dir) / "predictions.npz")


def build(cfg: ml_collections.ConfigDict) -> Switcher:
    return Switcher(hidden=tuple(cfg.hidden), dropout_rate=cfg.dropout_rate)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def train_step(state: SwitcherState, batch: dict[str, jnp.ndarray], *, model: Switcher, tx,
               pos_weight: float, neg_weight: float, seed: int):
    """One BCE step; `pos_weight`/`neg_weight` are 1 unless class balancing is on."""
    key = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["features"], batch["edge_logits"],
                             train=True, rngs={"dropout": key})
        t = batch["target"]
        weights = t * pos_weight + (1.0 - t) * neg_weight
        return jnp.mean(weights * optax.sigmoid_binary_cross_entropy(logits, t)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                          opt_state=opt_state)
    accuracy = jnp.mean((logits > 0) == (batch["target"] > 0.5))
    return state, SwitcherMetrics.single_from_model_output(loss=loss, accuracy=accuracy)


def scores(model: Switcher, params: Any, data: dict[str, np.ndarray]) -> np.ndarray:
    """`P(aligned)` for every clip of a labelled split."""
    return np.asarray(_probability(model, params, data["edge_features"], data["edge_logits"]))


# One compilation per switcher shape, reused.
_probability = jax.jit(switcher_lib.probability, static_argnums=0)


def _train_one(config, target: str, train_data, eval_data, mesh, out_dir: str,
               stamp: dict[str, Any]) -> dict[str, Any]:
    cfg = config.switcher
    model, tx = build(cfg), make_optimizer(cfg)
    features, logits = train_data["edge_features"], train_data["edge_logits"]
    repl = parallel.replicated(mesh)

    def init():
        params = model.init(jax.random.key(config.seed), jnp.asarray(features[:1]),
                            jnp.asarray(logits[:1]))["params"]
        return SwitcherState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))

    state = jax.jit(init, out_shardings=repl)()
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), 2)
    restored = ckpt.restore_latest(state)
    start = 0
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        reporting.log(f"[switcher:{target}] resumed from checkpoint step {start}")

    t = train_data[target].astype(np.float32)
    positive = float(np.mean(t))
    pos_weight, neg_weight = 1.0, 1.0
    if cfg.class_balance and 0.0 < positive < 1.0:
        pos_weight, neg_weight = 0.5 / positive, 0.5 / (1.0 - positive)
    step_fn = jax.jit(functools.partial(
        train_step, model=model, tx=tx, pos_weight=pos_weight, neg_weight=neg_weight,
        seed=config.seed), in_shardings=(repl, parallel.batch_sharded(mesh)),
        out_shardings=(repl, repl), donate_argnums=0)
    reporting.log(f"[switcher:{target}] {len(t)} clips, {positive:.1%} positive "
                  f"({'class-balanced' if cfg.class_balance else 'unweighted'}); "
                  f"{cfg.steps} steps of {cfg.batch_size}")

    rows = parallel.host_slice(cfg.batch_size)
    progress = reporting.Progress(cfg.steps, start, cfg.batch_size)
    writer = reporting.MetricWriter(out_dir)
    window = None
    for step in range(start + 1, cfg.steps + 1):
        idx = pipeline.train_indices(len(t), cfg.batch_size, step - 1, config.seed, rows)
        batch = parallel.to_global({"features": features[idx], "edge_logits": logits[idx],
                                    "target": t[idx]}, mesh)
        state, step_metrics = step_fn(state, batch)
        window = step_metrics if window is None else window.merge(step_metrics)
        if step % cfg.log_every == 0 or step == cfg.steps:
            values = {k: float(v) for k, v in window.compute().items()}
            window = None
            if not np.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"switcher loss became {values['loss']} by step {step}; lower "
                    f"config.switcher.learning_rate (now {cfg.learning_rate})")
            held_out = routing.auroc(scores(model, state.params, eval_data),
                                     eval_data[target] > 0.5)
            values["eval_auroc"] = held_out
            writer.scalars(step, {f"switcher/{k}": v for k, v in values.items()})
            reporting.log(progress.line(step, values, tag=f"switcher:{target}"))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(step, state, {"target": target})
    ckpt.wait()
    ckpt.close()
    writer.close()

    switcher_lib.save(os.path.join(out_dir, "switcher"), model, target, state.params, stamp)
    held_out = scores(model, state.params, eval_data)
    files.save_npz(os.path.join(out_dir, "predictions.npz"), score=held_out,
                       id=eval_data["id"], target=eval_data[target])
    result = {
        "auroc": routing.auroc(held_out, eval_data[target] > 0.5),
        "auroc_edge_correct": routing.auroc(held_out, eval_data["ground_truth"] > 0.5),
        "positive_rate": positive,
        "steps": cfg.steps,
    }
    reporting.log(f"[switcher:{target}] {cfg.eval_split} AUROC {result['auroc']:.4f} "
                  f"(vs edge correctness {result['auroc_edge_correct']:.4f})")
    return result
