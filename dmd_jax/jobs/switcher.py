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
that target). The `relaxed` target (Hybrid LLM's `1[p_C(edge class) >= max p_C - t]`) takes
`t` from the eval split by `switcher.relaxation`: label balance or calibration AUC
(`choose_relaxation`; the summary reports both).
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

# This job's computation version (`stamps.make`): bump it when its results would change
# for the same settings and inputs, so that results made by older code are not reused.
STAMP_VERSION = 1
SECTIONS = ("switcher",)
KEYS = {"switcher": ("label_dir", "targets", "train_split", "eval_split", "hidden",
                     "dropout_rate", "steps", "batch_size", "learning_rate", "weight_decay",
                     "class_balance", "relaxation", "relaxation_candidates", "log_every",
                     "checkpoint_every")}
# How the `relaxed` target's t is chosen (both are computed and reported): 'balance', Hybrid
# LLM's reference rule (the calibration labels nearest half positive), or 'auc' (the
# candidate t whose switcher has the best deferral AUC on the calibration split).
RELAXATIONS = ("balance", "auc")
# Switcher settings that change what is logged or kept, or where it comes from.
_BOOKKEEPING = ("log_every", "checkpoint_every", "label_dir", "eval_split", "targets")
_RELAXATION_KEYS = ("relaxation", "relaxation_candidates")  # only the `relaxed` target's


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
        summary["relaxation"] = choose_relaxation(config, train_data, eval_data, mesh)
        t = summary["relaxation"][cfg.relaxation]["t"]
        for data in (train_data, eval_data):
            data["relaxed"] = labels.relaxed_targets(data, t)
        reporting.log(f"[switcher:relaxed] t = {t:.4f} (by {cfg.relaxation}; "
                      f"{np.mean(eval_data['relaxed']):.1%} of the {cfg.eval_split} labels "
                      f"positive, hard agreement {np.mean(eval_data['hard']):.1%})")
    stamped = {}
    for target in cfg.targets:  # every target checked before anything is written
        if target == "ground_truth" and np.any(train_data["ground_truth"] < 0):
            raise UserError(f"target 'ground_truth' needs labels, but split "
                            f"{cfg.train_split!r} has unlabelled clips; drop it from "
                            "config.switcher.targets")
        ignored = _BOOKKEEPING + (() if target == "relaxed" else _RELAXATION_KEYS)
        stamped[target] = stamps.make(
            {"switcher": {k: v for k, v in cfg.items() if k not in ignored},
             "seed": config.seed, "target": target}, {"labels": label_identity},
            STAMP_VERSION)
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


def choose_relaxation(config, train_data, eval_data, mesh) -> dict[str, Any]:
    """Hybrid LLM's relaxation `t` chosen both ways on the eval (calibration) split, each
    with the deferral AUC (cloud answers unfused) of a switcher trained at that `t`:
    `balance`, the labels nearest half positive; `auc`, the best of `relaxation_candidates`
    values (0 and quantiles of the gaps that make labels positive). Needs labelled eval clips."""
    cfg = config.switcher
    if cfg.relaxation not in RELAXATIONS:
        raise UserError(f"config.switcher.relaxation={cfg.relaxation!r} must be one of "
                        f"{RELAXATIONS}")
    check_positive(cfg, ("relaxation_candidates",), "config.switcher")
    if np.any(eval_data["label"] < 0):
        raise UserError(f"choosing the relaxation needs the labels of split "
                        f"{cfg.eval_split!r}, which has unlabelled clips")
    balance = labels.balanced_relaxation(eval_data)
    gaps = labels.relaxation_gap(eval_data)
    positive = gaps[gaps > 0]
    quantiles = np.quantile(positive, np.linspace(0, 1, cfg.relaxation_candidates + 1)[1:-1]) \
        if len(positive) else np.zeros(0)
    candidates = sorted({0.0, balance, *map(float, quantiles)})
    edge_correct = eval_data["edge_logits"].argmax(-1) == eval_data["label"]
    cloud_correct = eval_data["cloud_logits"].argmax(-1) == eval_data["label"]
    aucs = {}
    for t in candidates:
        params = _fit(config, train_data, labels.relaxed_targets(train_data, t), mesh)
        priority = -scores(build(cfg), params, eval_data)  # the least sure go first
        aucs[t] = float(np.mean(routing.deferral_curve(priority, edge_correct, cloud_correct)))
        reporting.log(f"[switcher:relaxed] t = {t:.4f}: {cfg.eval_split} deferral AUC "
                      f"{aucs[t]:.4f}")
    best = max(candidates, key=lambda t: (aucs[t], -t))  # ties: the least relaxed
    return {"balance": {"t": balance, "calibration_auc": aucs[balance]},
            "auc": {"t": best, "calibration_auc": aucs[best]},
            "candidates": [{"t": t, "calibration_auc": aucs[t]} for t in candidates],
            "used": cfg.relaxation}


def _fit(config, data, targets: np.ndarray, mesh) -> Any:
    """A switcher trained on `targets` with the job's settings, in memory (no checkpoints,
    no logs): a probe for choosing the relaxation."""
    model, tx = build(config.switcher), make_optimizer(config.switcher)
    state, step_fn, _ = _prepared(config, model, tx, data, targets, mesh)
    for _, state, _ in _steps(config, step_fn, state, data, targets, mesh, start=0):
        pass
    return state.params


def _prepared(config, model: Switcher, tx, data, targets: np.ndarray, mesh):
    """`(initial state, jitted step, positive rate)`: class weights from `targets`."""
    cfg = config.switcher
    features, logits = data["edge_features"], data["edge_logits"]
    repl = parallel.replicated(mesh)

    def init():
        params = model.init(jax.random.key(config.seed), jnp.asarray(features[:1]),
                            jnp.asarray(logits[:1]))["params"]
        return SwitcherState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))

    positive = float(np.mean(targets))
    pos_weight, neg_weight = 1.0, 1.0
    if cfg.class_balance and 0.0 < positive < 1.0:
        pos_weight, neg_weight = 0.5 / positive, 0.5 / (1.0 - positive)
    step_fn = jax.jit(functools.partial(
        train_step, model=model, tx=tx, pos_weight=pos_weight, neg_weight=neg_weight,
        seed=config.seed), in_shardings=(repl, parallel.batch_sharded(mesh)),
        out_shardings=(repl, repl), donate_argnums=0)
    return jax.jit(init, out_shardings=repl)(), step_fn, positive


def _steps(config, step_fn, state, data, targets: np.ndarray, mesh, start: int):
    """Yields `(step, state, metrics)` for steps `start + 1 .. steps`: the same batches
    for a run and its resumption."""
    cfg = config.switcher
    rows = parallel.host_slice(cfg.batch_size)
    for step in range(start + 1, cfg.steps + 1):
        idx = pipeline.train_indices(len(targets), cfg.batch_size, step - 1, config.seed, rows)
        batch = parallel.to_global({"features": data["edge_features"][idx],
                                    "edge_logits": data["edge_logits"][idx],
                                    "target": targets[idx]}, mesh)
        state, step_metrics = step_fn(state, batch)
        yield step, state, step_metrics


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
    t = train_data[target].astype(np.float32)
    state, step_fn, positive = _prepared(config, model, tx, train_data, t, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), 2)
    restored = ckpt.restore_latest(state)
    start = 0
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        reporting.log(f"[switcher:{target}] resumed from checkpoint step {start}")
    reporting.log(f"[switcher:{target}] {len(t)} clips, {positive:.1%} positive "
                  f"({'class-balanced' if cfg.class_balance else 'unweighted'}); "
                  f"{cfg.steps} steps of {cfg.batch_size}")

    progress = reporting.Progress(cfg.steps, start, cfg.batch_size)
    writer = reporting.MetricWriter(out_dir)
    window = None
    for step, state, step_metrics in _steps(config, step_fn, state, train_data, t, mesh, start):
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
