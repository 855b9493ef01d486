"""The `evaluate_hybrid` job: calibrate the switcher, then compare every router.

Reads the label job's calibration and test splits (edge features and logits, cloud
logits, ground truth) and builds every router of `config.hybrid.routers`
(`dmd_jax.routers`: trained switchers, the edge's confidence, or a module of yours), then:

1. tunes the cloud-side fusion weight and the deployed router's threshold
   (`hybrid.deploy`) on the *calibration* split: to a target offload rate, or to the best
   accuracy under a GFLOPs budget (per clip, or a fraction of the cloud alone's);
2. on the *test* split, sweeps every router, and the `random` and `oracle` references,
   over offload rates 0..1 (deferral curves) and summarises them (AUC, APGR, CPT, oracle
   gap);
3. reports the operating point: realised offload rate, accuracy, GFLOPs per clip (XLA's
   count for each compiled model, lowered on shapes only) and upload bytes;
4. under distribution shift (`hybrid.shift_splits`: test splits the label job saw
   corrupted, `'test@fog@3'`): every router's APGR, the learned routers' APGR minus
   `max_prob`'s with a paired bootstrap interval, and the deployed router's realised
   offload at its clean-calibrated threshold against the target (it drifts: the shift
   moves the scores) and after recalibrating the threshold on the split's first
   `recalibration_window` clips (their scores only, no labels; realised on the rest).

Writes `summary.json`, `predictions.npz` (per test clip, with every router's score),
`curves.npz`, `operating_point.json` (what `hybrid.HybridClassifier.from_dirs` needs:
the router's spec and the fingerprints of the edge, router and labels it was calibrated
for), `deferral.png` and `report.md`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmd_jax import (files, flops, hybrid, jobs, model_store, reporting, routers, routing,
                     stamps)
from dmd_jax.data import labels
from dmd_jax.errors import UserError

SECTIONS = ("edge", "cloud", "hybrid", "runtime")
KEYS = {"hybrid": ("label_dir", "switcher_dir", "routers", "deploy", "compare_with_max_prob",
                   "calibration_split", "test_split", "compute_budget", "gflops_budget",
                   "target_offload", "fusion", "bootstrap_resamples", "guarantee_alphas",
                   "guarantee_delta", "shift_splits", "recalibration_window"),
        "edge": ("path",), "cloud": ("path",)}
FUSION_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)
REFERENCES = ("random", "oracle")  # curves, not deployable routers


@jobs.entry("evaluate_hybrid", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.hybrid
    _check_router_names(cfg)
    calibration = labels.read_split(cfg.label_dir, cfg.calibration_split)
    test = labels.read_split(cfg.label_dir, cfg.test_split)
    label_identity = labels.stamp_digest(cfg.label_dir)
    # After the labels: those are the first thing missing.
    built = {name: routers.load(spec, routers.Context(switcher_dir=cfg.switcher_dir))
             for name, spec in cfg.routers.items()}
    for name, router in built.items():
        if router.trained_on and router.trained_on != label_identity:
            raise stamps.StaleArtifactError(
                f"router {name!r} ({router.spec}) was trained on other labels than those in "
                f"{cfg.label_dir!r}: rerun the train_switcher job on these labels first")
    files.write_json(files.path(workdir) / "config.json", config.to_dict())
    calibration, test = _with_scores(built, calibration), _with_scores(built, test)
    edge = model_store.load(config.edge.path, "edge", config.runtime)
    costs = _costs(config, edge, built[cfg.deploy], test)

    rate, weight, threshold = _calibrate(cfg, calibration, costs)
    answers = _answers(test, weight)
    offloaded = test[cfg.deploy] < threshold
    correct = np.where(offloaded, answers["cloud_side_correct"], answers["edge_correct"])
    realised = float(offloaded.mean())
    point = {
        "router": cfg.routers[cfg.deploy], "router_name": cfg.deploy,
        "router_fingerprint": built[cfg.deploy].fingerprint,
        "edge_fingerprint": edge.fingerprint, "labels": label_identity,
        "target_offload": rate, "offload_rate": realised, "accuracy": float(correct.mean()),
        "threshold": threshold, "fusion_weight": weight,
        "gflops_per_clip": costs["edge"] + costs["router"] + realised * costs["cloud"],
        "cloud_gflops_per_clip": costs["cloud"], "edge_gflops_per_clip": costs["edge"],
        "router_gflops_per_clip": costs["router"], "eval_views": costs["eval_views"],
        "upload_bytes_per_clip": realised * costs["clip_bytes"],
    }
    point["compute_fraction_of_cloud"] = point["gflops_per_clip"] / costs["cloud"]

    curves = {name: routing.deferral_curve(-test[name], answers["edge_correct"],
                                           answers["cloud_side_correct"]) for name in built}
    curves.update(random=routing.deferral_curve(np.zeros(len(test["id"])),
                                                answers["edge_correct"],
                                                answers["cloud_side_correct"]),
                  oracle=routing.deferral_curve(
                      routing.oracle_priority(answers["edge_correct"],
                                              answers["cloud_side_correct"]),
                      answers["edge_correct"], answers["cloud_side_correct"]))
    edge_accuracy = float(answers["edge_correct"].mean())
    cloud_accuracy = float(answers["cloud_correct"].mean())
    summary_routers = routing.summarize(curves, edge_accuracy, cloud_accuracy)
    for name in built:  # RouteLLM's own way of computing them, for comparison with its papers
        summary_routers[name]["routellm"] = routing.routellm_metrics(
            -test[name], answers["edge_correct"], answers["cloud_side_correct"])
    for name in cfg.compare_with_max_prob:
        if cfg.bootstrap_resamples > 0:
            summary_routers[name]["auc_vs_max_prob"] = routing.auc_difference(
                -test[name], -test["max_prob"], answers["edge_correct"],
                answers["cloud_side_correct"], cfg.bootstrap_resamples, config.seed)
    summary = {
        "uploads": encoded_uploads(test, offloaded, weight, point, costs),
        "shift": {name: under_shift(cfg, built, name, threshold, rate, weight, config.seed)
                  for name in cfg.shift_splits},
        "guarantees": guarantees(cfg, calibration, test),
        "edge_accuracy": edge_accuracy, "cloud_accuracy": cloud_accuracy,
        "cloud_fused_accuracy": float(answers["cloud_side_correct"].mean()),
        "routers": summary_routers, "deployed_router": cfg.deploy,
        "operating_point": point, "num_test_clips": int(len(test["id"])),
        "calibration_split": cfg.calibration_split, "test_split": cfg.test_split,
    }
    files.save_npz(os.path.join(workdir, "predictions.npz"), id=test["id"],
                   label=test["label"], offloaded=offloaded,
                   prediction=np.where(offloaded, answers["cloud_side"], answers["edge"]),
                   edge_prediction=answers["edge"], cloud_prediction=answers["cloud"],
                   **{f"score_{name}": test[name] for name in built})
    files.save_npz(os.path.join(workdir, "curves.npz"), rates=routing.OFFLOAD_GRID, **curves)
    files.write_json(os.path.join(workdir, "operating_point.json"), point)
    files.write_json(os.path.join(workdir, "summary.json"), summary)
    _plot(os.path.join(workdir, "deferral.png"), curves, costs, summary)
    if len(summary["uploads"]) > 1:
        _plot_uploads(os.path.join(workdir, "uploads.png"), summary["uploads"])
    files.write_text(os.path.join(workdir, "report.md"), markdown(summary))
    reporting.log(markdown(summary))
    return summary


def encoded_uploads(test: dict[str, np.ndarray], offloaded: np.ndarray, weight: float,
                    point: dict[str, Any], costs: dict[str, float]) -> list[dict[str, Any]]:
    """The deployed operating point with the offloads sent raw and as H.264 at each CRF
    the label job encoded them at (`label.upload_crfs`): bytes per uploaded clip and per
    clip, and the accuracy when the cloud answers the decoded upload."""
    rows = [{"crf": None, "codec": "raw uint8", "bytes_per_uploaded_clip": costs["clip_bytes"],
             "bytes_per_clip": point["upload_bytes_per_clip"], "accuracy": point["accuracy"]}]
    crfs = sorted(int(k[len("cloud_logits_crf"):]) for k in test if k.startswith("cloud_logits_crf"))
    edge_correct = test["edge_logits"].argmax(-1) == test["label"]
    for crf in crfs:
        answer = hybrid.fuse(test["edge_logits"], test[f"cloud_logits_crf{crf}"], weight)
        correct = np.where(offloaded, answer == test["label"], edge_correct)
        sizes = test[f"upload_bytes_crf{crf}"].astype(np.float64)
        per_uploaded = float(sizes[offloaded].mean()) if offloaded.any() else float(sizes.mean())
        rows.append({"crf": crf, "codec": "H.264", "bytes_per_uploaded_clip": per_uploaded,
                     "bytes_per_clip": float(sizes[offloaded].sum() / len(sizes)),
                     "accuracy": float(correct.mean()),
                     "cloud_accuracy": float(np.mean(
                         test[f"cloud_logits_crf{crf}"].argmax(-1) == test["label"]))})
    return rows


def under_shift(cfg: ml_collections.ConfigDict, built: dict[str, routers.Router], split: str,
                threshold: float, rate: float, weight: float, seed: int) -> dict[str, Any]:
    """The routers on a shifted split (see the module docstring, step 4)."""
    data = _with_scores(built, labels.read_split(cfg.label_dir, split))
    answers = _answers(data, weight)
    edge_correct, cloud_correct = answers["edge_correct"], answers["cloud_side_correct"]
    curves = {name: routing.deferral_curve(-data[name], edge_correct, cloud_correct)
              for name in built}
    edge_accuracy, cloud_accuracy = float(edge_correct.mean()), float(cloud_correct.mean())
    apgr = {name: float(np.mean(routing.pgr(c, edge_accuracy, cloud_accuracy)))
            for name, c in curves.items()}
    versus = {}
    if cfg.bootstrap_resamples > 0 and "max_prob" in built:
        versus = {name: routing.apgr_difference(-data[name], -data["max_prob"], edge_correct,
                                                cloud_correct, cfg.bootstrap_resamples, seed)
                  for name in cfg.compare_with_max_prob}
    scores = data[cfg.deploy]
    window = min(cfg.recalibration_window, len(scores) // 2)
    recalibrated = routing.threshold_for_rate(scores[:window], rate)
    offloaded = scores < threshold
    correct = np.where(offloaded, cloud_correct, edge_correct)
    return {"edge_accuracy": edge_accuracy, "cloud_accuracy": cloud_accuracy,
            "apgr": apgr, "apgr_vs_max_prob": versus, "target_offload": rate,
            "offload_rate": float(offloaded.mean()), "accuracy": float(correct.mean()),
            "recalibration_window": window,
            "recalibrated_offload_rate": float(np.mean(scores[window:] < recalibrated)),
            "num_clips": int(len(scores))}


def guarantees(cfg: ml_collections.ConfigDict, calibration: dict[str, np.ndarray],
               test: dict[str, np.ndarray]) -> dict[str, Any]:
    """Thresholds of the deployed router that keep the edge's disagreement with the cloud
    (DMD's own target, no human label) at most alpha among the clips it keeps, with
    probability 1 - delta (`routing.guaranteed_threshold`), and what they realise on test;
    next to the plain quantile calibration (the largest keep rate whose calibration rate
    is <= alpha, no guarantee)."""
    scores_c, scores_t = calibration[cfg.deploy], test[cfg.deploy]
    disagree_c, disagree_t = calibration["hard"] < 0.5, test["hard"] < 0.5
    rows = []
    for alpha in cfg.guarantee_alphas:
        tau = routing.guaranteed_threshold(scores_c, disagree_c, alpha, cfg.guarantee_delta)
        plain = _empirical_threshold(scores_c, disagree_c, alpha)
        row = {"alpha": float(alpha)}
        for name, threshold in (("guaranteed", tau), ("quantile", plain)):
            kept = scores_t >= threshold
            row[name] = {"threshold": threshold, "test_offload_rate": float(1 - kept.mean()),
                         "test_disagreement": float(disagree_t[kept].mean()) if kept.any()
                         else 0.0}
        rows.append(row)
    return {"delta": float(cfg.guarantee_delta), "router": cfg.deploy, "rows": rows}


def _empirical_threshold(scores: np.ndarray, disagree: np.ndarray, alpha: float) -> float:
    """The lowest threshold whose kept calibration clips disagree at a rate <= alpha."""
    order = np.argsort(-scores, kind="stable")
    ranked, bad = scores[order], disagree[order]
    rate = np.cumsum(bad) / np.arange(1, len(bad) + 1)
    ok = [k for k in range(len(ranked)) if rate[k] <= alpha
          and (k + 1 == len(ranked) or ranked[k + 1] != ranked[k])]
    return float(ranked[ok[-1]]) if ok else float("inf")


def _check_router_names(cfg: ml_collections.ConfigDict) -> None:
    names = list(cfg.routers)
    clash = sorted(set(names) & set(REFERENCES))
    if clash:
        raise UserError(f"config.hybrid.routers: {clash} are the reference curves' names; "
                        "name your router otherwise")
    if cfg.deploy not in names:
        raise UserError(f"config.hybrid.deploy={cfg.deploy!r} is not one of "
                        f"config.hybrid.routers ({names})")
    missing = [n for n in cfg.compare_with_max_prob if n not in names]
    if missing or (cfg.compare_with_max_prob and "max_prob" not in names):
        raise UserError(f"config.hybrid.compare_with_max_prob={tuple(cfg.compare_with_max_prob)} "
                        f"needs those routers and 'max_prob' in config.hybrid.routers ({names})")


def _with_scores(built: dict[str, routers.Router],
                 data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`data` plus each router's score per clip (under the router's name)."""
    return {**data, **{name: router.scores(data["edge_features"], data["edge_logits"])
                       for name, router in built.items()}}


def _costs(config: ml_collections.ConfigDict, edge: model_store.LoadedModel,
           router: routers.Router, data: dict[str, np.ndarray]) -> dict[str, float]:
    """GFLOPs per clip of each compiled model (lowered on shapes: no weights compiled in)
    over every evaluation view the labels averaged, and bytes per uploaded clip."""
    cloud = model_store.load(config.cloud.path, "cloud", config.runtime,
                             class_names=edge.class_names)
    views = labels.eval_views(config.hybrid.label_dir)
    clip = jax.ShapeDtypeStruct((1, *edge.input_shape), jnp.uint8)
    edge_forward = lambda variables, video: edge.apply(variables, video)[0]
    features = jax.ShapeDtypeStruct((1, data["edge_features"].shape[1]), jnp.float32)
    logits = jax.ShapeDtypeStruct((1, data["edge_logits"].shape[1]), jnp.float32)
    return {"edge": views * flops.gflops(edge_forward, flops.abstract(edge.variables), clip),
            "cloud": views * hybrid.cloud_gflops(cloud),
            "eval_views": views,
            "router": flops.gflops(router.score, flops.abstract(router.params), features, logits),
            "clip_bytes": views * float(np.prod(cloud.input_shape))}  # uint8 views uploaded


def _answers(data: dict[str, np.ndarray], fusion_weight: float) -> dict[str, np.ndarray]:
    """Edge, cloud and cloud-side (fused) predictions and their correctness."""
    edge, cloud = data["edge_logits"].argmax(-1), data["cloud_logits"].argmax(-1)
    cloud_side = hybrid.fuse(data["edge_logits"], data["cloud_logits"], fusion_weight)
    y = data["label"]
    return {"edge": edge, "cloud": cloud, "cloud_side": cloud_side,
            "edge_correct": (edge == y).astype(np.float64),
            "cloud_correct": (cloud == y).astype(np.float64),
            "cloud_side_correct": (cloud_side == y).astype(np.float64)}


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
        spare = budget - costs["edge"] - costs["router"]
        max_rate = float(np.clip(spare / costs["cloud"], 0.0, 1.0))
    # Fusion: the weight whose cloud-side answer is best on the clips offloaded at max_rate.
    weight = 1.0
    if cfg.fusion:
        offloaded = data[cfg.deploy] < routing.threshold_for_rate(data[cfg.deploy], max_rate)
        if offloaded.any():
            accuracy = [np.mean(_answers(data, w)["cloud_side_correct"][offloaded])
                        for w in FUSION_GRID]
            weight = float(FUSION_GRID[int(np.argmax(accuracy))])
    rate = max_rate
    if budget > 0:  # the best calibration accuracy at any rate within budget
        answers = _answers(data, weight)
        curve = routing.deferral_curve(-data[cfg.deploy], answers["edge_correct"],
                                       answers["cloud_side_correct"])
        allowed = routing.OFFLOAD_GRID <= max_rate + 1e-12
        rate = float(routing.OFFLOAD_GRID[allowed][np.argmax(curve[allowed])])
    return rate, weight, routing.threshold_for_rate(data[cfg.deploy], rate)


def _plot(path: str, curves: dict[str, np.ndarray], costs: dict[str, float],
          summary: dict[str, Any]) -> None:
    plt = reporting.pyplot()

    rates = routing.OFFLOAD_GRID
    gflops = costs["edge"] + costs["router"] + rates * costs["cloud"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        style = {"random": ":", "oracle": "--"}.get(name, "-")
        width = 2.2 if name == summary["deployed_router"] else 1.2
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
    files.save_figure(fig, path)


def _plot_uploads(path: str, rows: list[dict[str, Any]]) -> None:
    """Hybrid accuracy against bytes per uploaded clip: raw and each CRF."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    encoded = [r for r in rows if r["crf"] is not None]
    ax.plot([r["bytes_per_uploaded_clip"] for r in encoded], [r["accuracy"] for r in encoded],
            "o-", label="H.264")
    for r in encoded:
        ax.annotate(f"CRF {r['crf']}", (r["bytes_per_uploaded_clip"], r["accuracy"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    raw = rows[0]
    ax.plot([raw["bytes_per_uploaded_clip"]], [raw["accuracy"]], "ks", label="raw uint8")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # decades only: minor labels overlap
    ax.set_xlabel("bytes per uploaded clip")
    ax.set_ylabel("hybrid accuracy at the operating point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path)


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
        f"Operating point ({summary.get('deployed_router', 'dmd_switcher')}, calibrated on "
        f"{summary['calibration_split']}): target offload "
        f"{point['target_offload']:.2f}, realised {point['offload_rate']:.3f}; accuracy "
        f"{point['accuracy']:.4f}; {point['gflops_per_clip']:.4f} GFLOPs per clip = "
        f"{point['compute_fraction_of_cloud']:.1%} of the cloud alone "
        f"({point['cloud_gflops_per_clip']:.4f}); fusion weight {point['fusion_weight']:.2f}; "
        f"upload {point['upload_bytes_per_clip']:.0f} bytes per clip.",
    ]
    if len(summary.get("uploads", [])) > 1:
        lines += ["", "Offloads sent raw or encoded (H.264 at a CRF; the cloud answers the "
                  "decoded clip), at the operating point:", "",
                  "| upload | bytes per uploaded clip | bytes per clip | accuracy |",
                  "|---|---|---|---|"]
        for row in summary["uploads"]:
            name = row["codec"] if row["crf"] is None else f"{row['codec']} CRF {row['crf']}"
            lines.append(f"| {name} | {row['bytes_per_uploaded_clip']:,.0f} | "
                         f"{row['bytes_per_clip']:,.0f} | {row['accuracy']:.4f} |")
    if summary.get("guarantees", {}).get("rows"):
        g = summary["guarantees"]
        lines += ["", f"Thresholds of {g['router']} bounding its disagreement with the cloud among "
                  f"the clips kept at the edge by alpha, with probability {1 - g['delta']:.0%} "
                  "(Clopper-Pearson, fixed-sequence testing), against the plain quantile "
                  "calibration; test split:", "",
                  "| alpha | guaranteed: test disagreement | offload | quantile: test "
                  "disagreement | offload |", "|---|---|---|---|---|"]
        for row in g["rows"]:
            ok, plain = row["guaranteed"], row["quantile"]
            lines.append(f"| {row['alpha']:.2f} | {ok['test_disagreement']:.3f} | "
                         f"{ok['test_offload_rate']:.1%} | {plain['test_disagreement']:.3f} | "
                         f"{plain['test_offload_rate']:.1%} |")
    if summary.get("shift"):
        learned = sorted({n for s in summary["shift"].values() for n in s["apgr_vs_max_prob"]})
        lines += ["", f"Under shift ({summary.get('deployed_router')} deployed at its clean "
                  "threshold; recalibrated: the threshold re-set on the split's first clips' "
                  "scores, realised on the rest; APGR differences with 95% paired bootstrap "
                  "intervals):", "",
                  "| split | edge acc. | cloud acc. | offload (target) | recalibrated | "
                  "accuracy | " + " | ".join(f"{n} − max_prob APGR" for n in learned) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(learned)]
        for split, s in summary["shift"].items():
            cells = [f"{s['apgr_vs_max_prob'][n]['difference']:+.3f} "
                     f"({s['apgr_vs_max_prob'][n]['ci95_low']:+.3f} .. "
                     f"{s['apgr_vs_max_prob'][n]['ci95_high']:+.3f})" for n in learned]
            lines.append(f"| {split} | {s['edge_accuracy']:.3f} | {s['cloud_accuracy']:.3f} | "
                         f"{s['offload_rate']:.1%} ({s['target_offload']:.0%}) | "
                         f"{s['recalibrated_offload_rate']:.1%} | {s['accuracy']:.3f} | "
                         + " | ".join(cells) + " |")
    for name in summary["routers"]:
        versus = summary["routers"][name].get("auc_vs_max_prob")
        if versus:
            lines.append(f"\n{name} AUC − max_prob AUC: {versus['difference']:+.4f} "
                         f"(95% paired bootstrap over the test clips: {versus['ci95_low']:+.4f} "
                         f"to {versus['ci95_high']:+.4f}).")
    return "\n".join(lines) + "\n"


def _router_rank(name: str) -> int:
    """The report's order: every configured router as listed, then the references."""
    return REFERENCES.index(name) + 1000 if name in REFERENCES else 0


def _pct(rate: float | None) -> str:
    """A CPT: NaN (or null, read back from JSON) means the target is never reached."""
    return "never" if rate is None or np.isnan(rate) else f"{rate:.0%}"


def _num(value: float | None, fmt: str) -> str:
    """Undefined figures (an edge as good as the cloud has no PGR) print as n/a."""
    return "n/a" if value is None or np.isnan(value) else format(value, fmt)
