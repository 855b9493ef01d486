"""The `train_switcher` job: fit the switcher to the label job's targets.

For each target in `config.switcher.targets` (the first is the switcher the hybrid system
uses, `hard` by default; `ground_truth` trains the ablation router) it trains a
`models.switcher.Switcher` on the labelled pool with binary cross-entropy (optionally
class-balanced), one jitted step over the `data` mesh like the `train` job, checkpoints
and resume included, then scores the held-out split. Output per target:
`WORKDIR/<target>/` with `checkpoints/`, the final `switcher/` export and
`predictions.npz`; top-level `summary.json` with `switcher_auroc` (of the first target:
how well `P(aligned)` ranks the held-out clips by that target).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metrics
from etils import epath

from dmd_jax import checkpoint, parallel, reporting, routing
from dmd_jax.data import pipeline
from dmd_jax.errors import UserError
from dmd_jax.jobs import label, train
from dmd_jax.models.switcher import Switcher

TARGETS = ("hard", "soft", "ground_truth")


@flax.struct.dataclass
class SwitcherState:
    step: jnp.ndarray
    params: Any
    opt_state: Any


SwitcherMetrics = metrics.Collection.create(
    loss=metrics.Average.from_output("loss"),
    accuracy=metrics.Average.from_output("accuracy"))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    reporting.ensure_workdir(workdir)
    reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    cfg = config.switcher
    unknown = [t for t in cfg.targets if t not in TARGETS]
    if unknown or not cfg.targets:
        raise ValueError(f"config.switcher.targets={tuple(cfg.targets)}: each must be one of "
                         f"{TARGETS}")
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)
    train_data = label.read_split(cfg.label_dir, cfg.train_split)
    eval_data = label.read_split(cfg.label_dir, cfg.eval_split)

    summary: dict[str, Any] = {"targets": {}, "train_split": cfg.train_split,
                               "eval_split": cfg.eval_split}
    for target in cfg.targets:
        if target == "ground_truth" and np.any(train_data["ground_truth"] < 0):
            raise UserError(f"target 'ground_truth' needs labels, but split "
                            f"{cfg.train_split!r} has unlabelled clips; drop it from "
                            "config.switcher.targets")
        summary["targets"][target] = _train_one(
            config, target, train_data, eval_data, mesh, os.path.join(workdir, target))
    first = summary["targets"][cfg.targets[0]]
    summary.update(switcher_auroc=first["auroc"], target=cfg.targets[0])
    reporting.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


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


@functools.partial(jax.jit, static_argnums=0)  # one compilation per switcher shape, reused
def _probability(model: Switcher, params: Any, features: jnp.ndarray,
                 edge_logits: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.sigmoid(model.apply({"params": params}, features, edge_logits))


def _train_one(config, target: str, train_data, eval_data, mesh, out_dir: str) -> dict[str, Any]:
    cfg = config.switcher
    reporting.ensure_workdir(out_dir)
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
                raise train.NonFiniteLossError(
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

    save(os.path.join(out_dir, "switcher"), cfg, target, state.params)
    held_out = scores(model, state.params, eval_data)
    reporting.save_npz(os.path.join(out_dir, "predictions.npz"), score=held_out,
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


def save(directory: str, cfg: ml_collections.ConfigDict, target: str, params: Any) -> None:
    """The trained switcher: params (orbax) + the settings that rebuild it (JSON, last)."""
    info_path = os.path.join(directory, "switcher.json")
    if parallel.is_main_process() and os.path.exists(info_path):
        os.remove(info_path)
    checkpoint.save_tree(os.path.join(directory, "params"), params)
    reporting.write_json(info_path, {
        "hidden": list(cfg.hidden), "dropout_rate": cfg.dropout_rate, "target": target,
        "feature_dim": int(params["feature_norm"]["scale"].shape[0])})


def load(directory: str) -> tuple[Switcher, Any, str]:
    """`(module, params, target)` of a switcher saved by `save`."""
    info_path = os.path.join(directory, "switcher.json")
    if not os.path.exists(info_path):
        raise UserError(f"no trained switcher in {directory!r} (switcher.json missing): run "
                        "the train_switcher job first and point config.hybrid.switcher_dir at "
                        "its workdir")
    with open(info_path) as f:
        info = json.load(f)
    model = Switcher(hidden=tuple(info["hidden"]), dropout_rate=info["dropout_rate"])
    path = os.path.join(directory, "params")
    if "feature_dim" in info:  # onto this job's devices, whatever topology saved it
        abstract = jax.eval_shape(model.init, jax.random.key(0),
                                  jnp.zeros((1, info["feature_dim"])), jnp.zeros((1, 2)))
        params = checkpoint.restore_everywhere(path, abstract["params"])
    else:  # saved before feature_dim was recorded: as it was saved (same topology only)
        with ocp.StandardCheckpointer() as restorer:
            params = restorer.restore(epath.Path(path).absolute())
    return model, params, info["target"]
