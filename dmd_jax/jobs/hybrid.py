"""The `evaluate_hybrid` job: calibrate the switcher, then compare every router.

Reads the label job's calibration and test splits (edge features and logits, cloud
logits, ground truth) and the trained switchers, then:

1. tunes the cloud-side fusion weight and the switcher threshold on the *calibration*
   split: to a target offload rate, or to the best accuracy under a GFLOPs budget (per
   clip, or a fraction of the cloud alone's);
2. on the *test* split, sweeps every router of METHODS.md §1 over offload rates 0..1
   (deferral curves) and summarises them (AUC, APGR, CPT, oracle gap);
3. reports the operating point: realised offload rate, accuracy, GFLOPs per clip (XLA's
   count for each compiled model) and upload bytes.

Writes `summary.json`, `predictions.npz` (per test clip), `curves.npz`,
`operating_point.json` (what `hybrid.HybridClassifier.from_dirs` needs),
`deferral.png` and `report.md`.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from dmd_jax import flops, hybrid, model_store, reporting, routing
from dmd_jax.data import pipeline
from dmd_jax.jobs import label
from dmd_jax.jobs import switcher as switcher_job
from dmd_jax.models.switcher import confidence_stats

FUSION_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    reporting.ensure_workdir(workdir)
    reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    cfg = config.hybrid
    calibration = label.read_split(cfg.label_dir, cfg.calibration_split)
    test = label.read_split(cfg.label_dir, cfg.test_split)
    switchers = _load_switchers(cfg)  # after the labels: those are the first thing missing
    calibration, test = _with_scores(switchers, calibration), _with_scores(switchers, test)
    costs = _costs(config, test, *switchers["dmd_switcher"])

    rate, weight, threshold = _calibrate(cfg, calibration, costs)
    answers = _answers(test, weight)
    offloaded = test["dmd_switcher"] < threshold
    correct = np.where(offloaded, answers["cloud_side_correct"], answers["edge_correct"])
    realised = float(offloaded.mean())
    point = {
        "target_offload": rate, "offload_rate": realised, "accuracy": float(correct.mean()),
        "threshold": threshold, "fusion_weight": weight,
        "gflops_per_clip": costs["edge"] + costs["switcher"] + realised * costs["cloud"],
        "cloud_gflops_per_clip": costs["cloud"], "edge_gflops_per_clip": costs["edge"],
        "switcher_gflops_per_clip": costs["switcher"],
        "upload_bytes_per_clip": realised * costs["clip_bytes"],
    }
    point["compute_fraction_of_cloud"] = point["gflops_per_clip"] / costs["cloud"]

    priorities = _priorities(test, answers)
    curves = {name: routing.deferral_curve(priority, answers["edge_correct"],
                                           answers["cloud_side_correct"])
              for name, priority in priorities.items()}
    edge_accuracy = float(answers["edge_correct"].mean())
    cloud_accuracy = float(answers["cloud_correct"].mean())
    routers = routing.summarize(curves, edge_accuracy, cloud_accuracy)
    _compare_with_max_prob(routers, priorities, answers, cfg.bootstrap_resamples, config.seed)
    summary = {
        "edge_accuracy": edge_accuracy, "cloud_accuracy": cloud_accuracy,
        "cloud_fused_accuracy": float(answers["cloud_side_correct"].mean()),
        "routers": routers,
        "operating_point": point, "num_test_clips": int(len(test["id"])),
        "calibration_split": cfg.calibration_split, "test_split": cfg.test_split,
    }
    reporting.save_npz(os.path.join(workdir, "predictions.npz"), id=test["id"],
                       label=test["label"], offloaded=offloaded,
                       prediction=np.where(offloaded, answers["cloud_side"], answers["edge"]),
                       edge_prediction=answers["edge"], cloud_prediction=answers["cloud"],
                       dmd_score=test["dmd_switcher"])
    reporting.save_npz(os.path.join(workdir, "curves.npz"), rates=routing.OFFLOAD_GRID,
                       **curves)
    reporting.write_json(os.path.join(workdir, "operating_point.json"), point)
    reporting.write_json(os.path.join(workdir, "summary.json"), summary)
    _plot(os.path.join(workdir, "deferral.png"), curves, costs, summary)
    reporting.write_atomic(os.path.join(workdir, "report.md"), markdown(summary))
    reporting.log(markdown(summary))
    return summary


def _load_switchers(cfg: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """`dmd_switcher` (and `gt_switcher` where trained): `(module, params)` each."""
    switchers = {}
    for router, target in (("dmd_switcher", cfg.switcher_target), ("gt_switcher", "ground_truth")):
        directory = os.path.join(cfg.switcher_dir, target, "switcher")
        if router == "gt_switcher" and not os.path.exists(directory):
            continue  # the ablation is optional
        module, params, _ = switcher_job.load(directory)
        switchers[router] = (module, params)
    return switchers


def _with_scores(switchers: dict[str, tuple[Any, Any]],
                 data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`data` plus each router's P(aligned) per clip."""
    return {**data, **{router: switcher_job.scores(module, params, data)
                       for router, (module, params) in switchers.items()}}


def _costs(config: ml_collections.ConfigDict, data: dict[str, np.ndarray], module,
           params) -> dict[str, float]:
    """GFLOPs per clip of each compiled model, and bytes per uploaded clip."""
    result = {}
    for role in ("edge", "cloud"):
        model = model_store.load(config[role].path, role=role)
        if role == "cloud":  # a zero-shot cloud is prompted with the dataset's classes
            model = label.zero_shot_for(model, config.cloud.path,
                                        pipeline.make_builder(config.data))
        clip = jnp.zeros((1, *model.input_shape), jnp.uint8)
        result[role] = flops.gflops(
            lambda v, m=model: m.classify(v)[0], clip)
        result["clip_bytes"] = float(np.prod(model.input_shape))  # uint8 pixels
    result["switcher"] = flops.gflops(
        lambda f, l: module.apply({"params": params}, f, l),
        jnp.asarray(data["edge_features"][:1]), jnp.asarray(data["edge_logits"][:1]))
    return result


def _answers(data: dict[str, np.ndarray], fusion_weight: float) -> dict[str, np.ndarray]:
    """Edge, cloud and cloud-side (fused) predictions and their correctness."""
    edge, cloud = data["edge_logits"].argmax(-1), data["cloud_logits"].argmax(-1)
    cloud_side = hybrid.fuse(data["edge_logits"], data["cloud_logits"], fusion_weight)
    y = data["label"]
    return {"edge": edge, "cloud": cloud, "cloud_side": cloud_side,
            "edge_correct": (edge == y).astype(np.float64),
            "cloud_correct": (cloud == y).astype(np.float64),
            "cloud_side_correct": (cloud_side == y).astype(np.float64)}


def _priorities(data: dict[str, np.ndarray], answers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each router's offload priority per clip: higher goes to the cloud first."""
    stats = {k: np.asarray(v) for k, v in confidence_stats(jnp.asarray(data["edge_logits"])).items()}
    priorities = {"dmd_switcher": -data["dmd_switcher"]}
    if "gt_switcher" in data:
        priorities["gt_switcher"] = -data["gt_switcher"]
    priorities.update(
        max_prob=-stats["max_prob"], entropy=stats["entropy"], margin=-stats["margin"],
        random=np.zeros(len(data["id"])),
        oracle=routing.oracle_priority(answers["edge_correct"], answers["cloud_side_correct"]))
    return priorities


LEARNED_ROUTERS = ("dmd_switcher", "gt_switcher")


def _compare_with_max_prob(routers: dict[str, dict[str, float]], priorities: dict[str, np.ndarray],
                           answers: dict[str, np.ndarray], resamples: int, seed: int) -> None:
    """Adds `auc_vs_max_prob` (difference, 95% paired-bootstrap interval) to the learned
    routers: whether a switcher beats the edge's own confidence is the question."""
    for name in LEARNED_ROUTERS:
        if name in routers and resamples > 0:
            routers[name]["auc_vs_max_prob"] = routing.auc_difference(
                priorities[name], priorities["max_prob"], answers["edge_correct"],
                answers["cloud_side_correct"], resamples, seed)


def _gflops_budget(cfg: ml_collections.ConfigDict, costs: dict[str, float]) -> float:
    """GFLOPs per clip the operating point may spend (0: none, use `target_offload`):
    `gflops_budget` as given, else `compute_budget` times the cloud alone's cost."""
    if cfg.gflops_budget > 0:
        return float(cfg.gflops_budget)
    return float(cfg.compute_budget) * costs["cloud"]


def _calibrate(cfg: ml_collections.ConfigDict, data: dict[str, np.ndarray],
               costs: dict[str, float]) -> tuple[float, float, float]:
    """(offload rate, fusion weight, threshold), all chosen on the calibration split."""
    max_rate = cfg.target_offload
    budget = _gflops_budget(cfg, costs)
    if budget > 0:
        spare = budget - costs["edge"] - costs["switcher"]
        max_rate = float(np.clip(spare / costs["cloud"], 0.0, 1.0))
    # Fusion: the weight whose cloud-side answer is best on the clips offloaded at max_rate.
    weight = 1.0
    if cfg.fusion:
        offloaded = data["dmd_switcher"] < routing.threshold_for_rate(data["dmd_switcher"], max_rate)
        if offloaded.any():
            accuracy = [np.mean(_answers(data, w)["cloud_side_correct"][offloaded])
                        for w in FUSION_GRID]
            weight = float(FUSION_GRID[int(np.argmax(accuracy))])
    rate = max_rate
    if budget > 0:  # the best calibration accuracy at any rate within budget
        answers = _answers(data, weight)
        curve = routing.deferral_curve(-data["dmd_switcher"], answers["edge_correct"],
                                       answers["cloud_side_correct"])
        allowed = routing.OFFLOAD_GRID <= max_rate + 1e-12
        rate = float(routing.OFFLOAD_GRID[allowed][np.argmax(curve[allowed])])
    return rate, weight, routing.threshold_for_rate(data["dmd_switcher"], rate)


def _plot(path: str, curves: dict[str, np.ndarray], costs: dict[str, float],
          summary: dict[str, Any]) -> None:
    plt = reporting.pyplot()

    rates = routing.OFFLOAD_GRID
    gflops = costs["edge"] + costs["switcher"] + rates * costs["cloud"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        style = {"random": ":", "oracle": "--"}.get(name, "-")
        width = 2.2 if name == "dmd_switcher" else 1.2
        axes[0].plot(rates, curve, style, lw=width, label=name)
        axes[1].plot(gflops, curve, style, lw=width, label=name)
    point = summary["operating_point"]
    for ax, x in ((axes[0], point["offload_rate"]), (axes[1], point["gflops_per_clip"])):
        ax.axhline(summary["cloud_accuracy"], color="grey", lw=0.8, label="cloud_only")
        ax.axhline(summary["edge_accuracy"], color="grey", lw=0.8, ls="-.", label="edge_only")
        ax.plot([x], [point["accuracy"]], "k*", ms=12, label="operating point")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[1].axvline(0.5 * costs["cloud"], color="grey", lw=0.8, ls=":", label="50% of cloud GFLOPs")
    axes[0].set_xlabel("offload rate")
    axes[1].set_xlabel("GFLOPs per clip")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    reporting.save_figure(fig, path)


def markdown(summary: dict[str, Any]) -> str:
    """The router table and the operating point, as markdown."""
    point = summary["operating_point"]
    lines = [
        f"edge accuracy {summary['edge_accuracy']:.4f} · cloud accuracy "
        f"{summary['cloud_accuracy']:.4f} · {summary['num_test_clips']} test clips",
        "",
        "| router | AUC | APGR | CPT(50%) | CPT(80%) | CPT(95%) | oracle gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(summary["routers"], key=_router_rank):
        m = summary["routers"][name]
        lines.append(f"| {name} | {m['auc']:.4f} | {_num(m['apgr'], '.3f')} | "
                     f"{_pct(m['cpt_50'])} | {_pct(m['cpt_80'])} | {_pct(m['cpt_95'])} | "
                     f"{_num(m['oracle_gap'], '.3f')} |")
    lines += [
        "",
        f"Operating point (calibrated on {summary['calibration_split']}): target offload "
        f"{point['target_offload']:.2f}, realised {point['offload_rate']:.3f}; accuracy "
        f"{point['accuracy']:.4f}; {point['gflops_per_clip']:.4f} GFLOPs per clip = "
        f"{point['compute_fraction_of_cloud']:.1%} of the cloud alone "
        f"({point['cloud_gflops_per_clip']:.4f}); fusion weight {point['fusion_weight']:.2f}; "
        f"upload {point['upload_bytes_per_clip']:.0f} bytes per clip.",
    ]
    for name in LEARNED_ROUTERS:
        versus = summary["routers"].get(name, {}).get("auc_vs_max_prob")
        if versus:
            lines.append(f"\n{name} AUC − max_prob AUC: {versus['difference']:+.4f} "
                         f"(95% paired bootstrap over the test clips: {versus['ci95_low']:+.4f} "
                         f"to {versus['ci95_high']:+.4f}).")
    return "\n".join(lines) + "\n"


ROUTERS = ("dmd_switcher", "gt_switcher", "max_prob", "entropy", "margin", "random", "oracle")


def _router_rank(name: str) -> int:
    return ROUTERS.index(name) if name in ROUTERS else len(ROUTERS)


def _pct(rate: float | None) -> str:
    """A CPT: NaN (or null, read back from JSON) means the target is never reached."""
    return "never" if rate is None or np.isnan(rate) else f"{rate:.0%}"


def _num(value: float | None, fmt: str) -> str:
    """Undefined figures (an edge as good as the cloud has no PGR) print as n/a."""
    return "n/a" if value is None or np.isnan(value) else format(value, fmt)
