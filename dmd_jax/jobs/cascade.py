"""The `evaluate_cascade` job: more than two tiers (edge -> middle -> cloud), one router
per hop, calibrated jointly under a compute budget (`dmd_jax.cascade`).

Hop `k` routes from tier `k` to tier `k + 1` with a router scoring tier `k`'s own features
and logits; it is trained as the two-tier hybrid's is, on the label job's agreement of tier
`k` with the *last* tier (`cascade.label_dirs[k]`: the label job run with tier `k` as its
edge and the last tier as its cloud; `cascade.switcher_dirs[k]`: train_switcher on those
labels). Agreement with the final answer is what matters at every hop: a clip the middle
tier would also get wrong is worth sending on.

For each system of `cascade.systems` (a router spec per hop: DMD switchers, `max_prob`...)
the job evaluates every *chain* of tiers ending at the last one (the full cascade, and each
two-tier hybrid such as edge -> cloud or middle -> cloud, using the same hop routers) on a
grid of thresholds per hop chosen on the calibration split, and reports on test:

- the non-decreasing convex hull of each chain's cost-accuracy points and its AIQ
  (RouterBench), over one cost range shared by everything compared;
- the operating point: the best calibration accuracy within `compute_budget` of the last
  tier's GFLOPs per clip (or `gflops_budget`), realised on test, with each tier's reach;
- the cheapest cascade reaching the last tier's accuracy: chosen on calibration, and (the
  curve read on test, no calibration) the test grid's own cheapest such point.

Writes `summary.json`, `grids.npz` (every grid point's calibration and test accuracy and
GFLOPs, and the thresholds), `cascade.png` (the cost-accuracy plane) and `report.md`.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmd_jax import cascade, files, flops, jobs, model_store, reporting, routers, stamps
from dmd_jax.data import labels
from dmd_jax.errors import UserError

SECTIONS = ("cascade", "runtime")
KEYS = {"cascade": ("tiers", "models", "label_dirs", "switcher_dirs", "systems", "deploy",
                    "calibration_split", "test_split", "rates_per_hop", "compute_budget",
                    "gflops_budget")}
CLOUD_LOGITS_TOLERANCE = 1e-3  # the last tier's logits in two label dirs: the same model


@jobs.entry("evaluate_cascade", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.cascade
    tiers = _check_shape(cfg)
    models = _load_models(cfg, config.runtime)
    splits = {name: _read_hops(cfg, getattr(cfg, f"{name}_split"), models)
              for name in ("calibration", "test")}
    files.write_json(files.path(workdir) / "config.json", config.to_dict())
    model_gflops = _model_gflops(models, cfg)
    rates = np.linspace(0.0, 1.0, int(cfg.rates_per_hop))
    last = len(tiers) - 1
    budget = float(cfg.gflops_budget) if cfg.gflops_budget > 0 else \
        float(cfg.compute_budget) * model_gflops[last]

    systems: dict[str, Any] = {}
    grids: dict[str, np.ndarray] = {}
    for system, specs in cfg.systems.items():
        built = [routers.load(spec, routers.Context(switcher_dir=cfg.switcher_dirs[k]))
                 for k, spec in enumerate(specs)]
        _check_trained_on(built, cfg)
        costs = {"model": model_gflops, "router": _router_gflops(built, splits["test"])}
        scores = {name: [r.scores(h["edge_features"], h["edge_logits"])
                         for r, h in zip(built, split["hops"])]
                  for name, split in splits.items()}
        systems[system] = {}
        for chain in chains(len(tiers)):
            key = "->".join(tiers[k] for k in chain)
            result, arrays = _evaluate_chain(chain, splits, scores, costs, rates, budget)
            systems[system][key] = result
            grids.update({f"{system}/{key}/{name}": value for name, value in arrays.items()})

    tiers_alone = {tiers[k]: {"accuracy": float(splits["test"]["correct"][k].mean()),
                              "gflops_per_clip": model_gflops[k]} for k in range(len(tiers))}
    span = _cost_span(grids)
    for chains_of in systems.values():
        for result in chains_of.values():
            result["aiq"] = cascade.aiq(np.asarray(result["test_hull"]), *span)
    summary = {
        "tiers": list(tiers), "tiers_alone": tiers_alone, "deploy": cfg.deploy,
        "gflops_budget": budget, "aiq_cost_range": list(span),
        "last_tier_gflops_per_clip": model_gflops[last], "systems": systems,
        "num_test_clips": int(len(splits["test"]["label"])),
        "calibration_split": cfg.calibration_split, "test_split": cfg.test_split,
    }
    files.save_npz(os.path.join(workdir, "grids.npz"), rates=rates, **grids)
    files.write_json(os.path.join(workdir, "summary.json"), summary)
    _plot(os.path.join(workdir, "cascade.png"), summary, grids)
    files.write_text(os.path.join(workdir, "report.md"), markdown(summary))
    reporting.log(markdown(summary))
    return summary


def chains(num_tiers: int) -> list[tuple[int, ...]]:
    """Every sequence of two or more tiers, in order, that ends at the last tier: the full
    cascade first, then the shorter ones by their first tier."""
    last = num_tiers - 1
    out = [c + (last,) for size in range(num_tiers - 1, 0, -1)
           for c in itertools.combinations(range(last), size)]
    return out


def _check_shape(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    tiers = tuple(cfg.tiers)
    hops = len(tiers) - 1
    if hops < 1 or len(set(tiers)) != len(tiers):
        raise UserError(f"config.cascade.tiers={tiers}: name two or more tiers, each once")
    for key, want in (("models", len(tiers)), ("label_dirs", hops), ("switcher_dirs", hops)):
        if len(cfg[key]) != want:
            raise UserError(f"config.cascade.{key} has {len(cfg[key])} entries; the "
                            f"{len(tiers)} tiers {tiers} need {want} (one per "
                            f"{'tier' if key == 'models' else 'hop'})")
    for system, specs in cfg.systems.items():
        if len(specs) != hops:
            raise UserError(f"config.cascade.systems.{system} gives {len(specs)} routers; the "
                            f"{hops} hops need one each")
    if cfg.deploy not in cfg.systems:
        raise UserError(f"config.cascade.deploy={cfg.deploy!r} is not one of "
                        f"config.cascade.systems ({list(cfg.systems)})")
    if cfg.rates_per_hop < 2:
        raise UserError(f"config.cascade.rates_per_hop={cfg.rates_per_hop}: needs >= 2 "
                        "(offload rates 0 and 1 at least)")
    return tiers


def _load_models(cfg: ml_collections.ConfigDict,
                 runtime: ml_collections.ConfigDict) -> list[model_store.LoadedModel]:
    for k, path in enumerate(cfg.models):
        model_store.require(path, cfg.tiers[k])
    first = model_store.load(cfg.models[0], cfg.tiers[0], runtime)
    return [first] + [model_store.load(path, cfg.tiers[k + 1], runtime,
                                       class_names=first.class_names)
                      for k, path in enumerate(cfg.models[1:])]


def _read_hops(cfg: ml_collections.ConfigDict, split: str,
               models: list[model_store.LoadedModel]) -> dict[str, Any]:
    """Each hop's labelled split, checked to be the same clips with the same last tier and
    made by the tiers' models (the label dirs' stamps); each tier's correctness."""
    hops = []
    for k, label_dir in enumerate(cfg.label_dirs):
        stamp = stamps.read(files.path(label_dir) / stamps.STAMP_FILE) or {}
        made_by = stamp.get("inputs", {})
        for role, model in (("edge", models[k]), ("cloud", models[-1])):
            if made_by.get(role) != model.fingerprint:
                tier = cfg.tiers[k] if role == "edge" else cfg.tiers[-1]
                raise stamps.StaleArtifactError(
                    f"config.cascade.label_dirs[{k}]={label_dir!r} was labelled with another "
                    f"{role} model (fingerprint {made_by.get(role)}) than tier {tier!r} "
                    f"({model.fingerprint}, {model.directory}): run the label job with "
                    f"edge.path={cfg.models[k]!r} and cloud.path={cfg.models[-1]!r} there")
        hops.append(labels.read_split(label_dir, split))
    first = hops[0]
    for k, hop in enumerate(hops[1:], start=1):
        if not (np.array_equal(hop["id"], first["id"])
                and np.array_equal(hop["label"], first["label"])):
            raise UserError(f"config.cascade.label_dirs[{k}] and [0] hold different clips of "
                            f"split {split!r}: label both on the same data")
        gap = float(np.max(np.abs(hop["cloud_logits"] - first["cloud_logits"])))
        if gap > CLOUD_LOGITS_TOLERANCE:
            raise UserError(f"the last tier's logits differ by {gap:.2g} between "
                            f"config.cascade.label_dirs[{k}] and [0] on split {split!r} "
                            "(the same model on the same clips): label both with the same "
                            "runtime and data settings")
    correct = [(h["edge_logits"].argmax(-1) == h["label"]).astype(np.float64) for h in hops]
    correct.append((first["cloud_logits"].argmax(-1) == first["label"]).astype(np.float64))
    return {"hops": hops, "correct": correct, "label": first["label"]}


def _check_trained_on(built: list[routers.Router], cfg: ml_collections.ConfigDict) -> None:
    for k, router in enumerate(built):
        identity = labels.stamp_digest(cfg.label_dirs[k])
        if router.trained_on and router.trained_on != identity:
            raise stamps.StaleArtifactError(
                f"hop {k}'s router {router.spec} (in {cfg.switcher_dirs[k]!r}) was trained on "
                f"other labels than config.cascade.label_dirs[{k}]={cfg.label_dirs[k]!r}: "
                "rerun train_switcher on those labels")


def _model_gflops(models: list[model_store.LoadedModel],
                  cfg: ml_collections.ConfigDict) -> list[float]:
    """GFLOPs per clip of each tier's model over the evaluation views the labels averaged
    (XLA's count, lowered on shapes only)."""
    views = labels.eval_views(cfg.label_dirs[0])
    out = []
    for model in models:
        clip = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.uint8)
        forward = lambda variables, video, m=model: m.apply(variables, video)[0]
        out.append(views * flops.gflops(forward, flops.abstract(model.variables), clip))
    return out


def _router_gflops(built: list[routers.Router], split: dict[str, Any]) -> list[float]:
    """GFLOPs per clip of each hop's router on its tier's features and logits."""
    out = []
    for router, hop in zip(built, split["hops"]):
        features = jax.ShapeDtypeStruct((1, hop["edge_features"].shape[1]), jnp.float32)
        logits = jax.ShapeDtypeStruct((1, hop["edge_logits"].shape[1]), jnp.float32)
        out.append(flops.gflops(router.score, flops.abstract(router.params), features, logits))
    return out


def _evaluate_chain(chain: tuple[int, ...], splits: dict[str, Any],
                    scores: dict[str, list[np.ndarray]], costs: dict[str, list[float]],
                    rates: np.ndarray, budget: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """One chain's grids on both splits (thresholds from the calibration scores), its
    test hull, the operating point and the cheapest point reaching the last tier."""
    last = chain[-1]
    tier_costs = [costs["model"][k] + (costs["router"][k] if k != last else 0.0) for k in chain]
    hop_scores = {name: [scores[name][k] for k in chain[:-1]] for name in splits}
    thresholds = [cascade.hop_thresholds(s, rates) for s in hop_scores["calibration"]]
    grid = {name: cascade.evaluate([splits[name]["correct"][k] for k in chain],
                                   hop_scores[name], thresholds, tier_costs,
                                   [rates] * len(thresholds))
            for name in splits}
    cloud_accuracy = {name: float(splits[name]["correct"][last].mean()) for name in splits}
    point = cascade.best_within(grid["calibration"], budget)
    result = {
        "tiers": list(chain),
        "test_hull": cascade.non_decreasing_hull(grid["test"].gflops,
                                                 grid["test"].accuracy).tolist(),
        "operating_point": {**_point(grid, point, costs["model"][last]),  # else the cheapest
                            "within_budget": bool(grid["calibration"].gflops[point]
                                                  <= budget + 1e-12)},
        "reaching_last_tier": {
            "calibrated": _maybe_point(grid, cascade.cheapest_reaching(
                grid["calibration"], cloud_accuracy["calibration"]), costs["model"][last]),
            "on_test": _maybe_point(grid, cascade.cheapest_reaching(
                grid["test"], cloud_accuracy["test"]), costs["model"][last]),
        },
    }
    arrays = {f"{name}_{field}": getattr(grid[name], field)
              for name in splits for field in ("accuracy", "gflops")}
    arrays.update({f"thresholds_hop{i}": t for i, t in enumerate(thresholds)})
    return result, arrays


def _point(grid: dict[str, cascade.Grid], index: tuple[int, ...],
           last_gflops: float) -> dict[str, Any]:
    """A grid point: its calibration offload rates per hop, and what it does on each split."""
    out: dict[str, Any] = {"hop_rates": [float(grid["test"].rates[h][i])
                                         for h, i in enumerate(index)]}
    for name, g in grid.items():
        out[name] = {"accuracy": float(g.accuracy[index]),
                     "gflops_per_clip": float(g.gflops[index]),
                     "fraction_of_last_tier": float(g.gflops[index] / last_gflops),
                     "reach": [float(r) for r in g.reach[index]]}
    return out


def _maybe_point(grid, index, last_gflops) -> dict[str, Any] | None:
    return None if index is None else _point(grid, index, last_gflops)


def _cost_span(grids: dict[str, np.ndarray]) -> tuple[float, float]:
    """AIQ's cost range, shared by everything compared: the cheapest to the costliest
    cascade on test."""
    spent = [g for name, g in grids.items() if name.endswith("/test_gflops")]
    return float(min(g.min() for g in spent)), float(max(g.max() for g in spent))


def _plot(path: str, summary: dict[str, Any], grids: dict[str, np.ndarray]) -> None:
    """The cost-accuracy plane on test: the deployed system's full-cascade grid points,
    every chain's hull, each tier alone, the operating points."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    deploy = summary["deploy"]
    full = "->".join(summary["tiers"])
    ax.scatter(np.ravel(grids[f"{deploy}/{full}/test_gflops"]),
               np.ravel(grids[f"{deploy}/{full}/test_accuracy"]), s=2, alpha=0.15,
               color="tab:blue", label=f"{deploy}: {full} grid")
    for system, chains_of in summary["systems"].items():
        for chain, result in chains_of.items():
            hull = np.asarray(result["test_hull"])
            style = "-" if system == deploy else "--"
            line, = ax.plot(hull[:, 0], hull[:, 1], style, lw=1.6 if chain == full else 1.0,
                            label=f"{system}: {chain} (AIQ {result['aiq']:.4f})")
            test = result["operating_point"]["test"]
            ax.plot([test["gflops_per_clip"]], [test["accuracy"]], "*", ms=9,
                    color=line.get_color())
    for name, tier in summary["tiers_alone"].items():
        ax.plot([tier["gflops_per_clip"]], [tier["accuracy"]], "ks", ms=5)
        ax.annotate(name, (tier["gflops_per_clip"], tier["accuracy"]), fontsize=8,
                    xytext=(4, -10), textcoords="offset points")
    ax.axvline(summary["gflops_budget"], color="grey", lw=0.8, ls=":", label="budget")
    ax.set_xlabel("GFLOPs per clip")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    files.save_figure(fig, path)


def markdown(summary: dict[str, Any]) -> str:
    """Tiers alone, then per system and chain: AIQ, the operating point, the cheapest
    cascade reaching the last tier's accuracy."""
    last = summary["last_tier_gflops_per_clip"]
    lines = ["| tier alone | test accuracy | GFLOPs per clip | of the last tier |",
             "|---|---|---|---|"]
    for name, tier in summary["tiers_alone"].items():
        lines.append(f"| {name} | {tier['accuracy']:.4f} | {tier['gflops_per_clip']:.4f} | "
                     f"{tier['gflops_per_clip'] / last:.1%} |")
    low, high = summary["aiq_cost_range"]
    lines += ["", f"Cascades on {summary['num_test_clips']} test clips; thresholds calibrated on "
              f"{summary['calibration_split']}; operating point: the best calibration accuracy "
              f"within {summary['gflops_budget']:.4f} GFLOPs per clip; AIQ over "
              f"{low:.4f}..{high:.4f} GFLOPs:", "",
              "| system | chain | AIQ | operating point: accuracy | GFLOPs (of last tier) | "
              "reach per tier | cheapest at the last tier's accuracy: calibrated | read on "
              "test |", "|---|---|---|---|---|---|---|---|"]
    for system, chains_of in summary["systems"].items():
        for chain, r in chains_of.items():
            test = r["operating_point"]["test"]
            reach = " / ".join(f"{x:.0%}" for x in test["reach"])
            over = "" if r["operating_point"]["within_budget"] else " (none within budget: the cheapest)"
            cells = [_reaching(r["reaching_last_tier"][k]) for k in ("calibrated", "on_test")]
            lines.append(f"| {system} | {chain} | {r['aiq']:.4f} | {test['accuracy']:.4f} | "
                         f"{test['gflops_per_clip']:.4f} ({test['fraction_of_last_tier']:.1%}){over} | "
                         f"{reach} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _reaching(point: dict[str, Any] | None) -> str:
    if point is None:
        return "never"
    test = point["test"]
    return f"{test['accuracy']:.4f} at {test['fraction_of_last_tier']:.1%}"
