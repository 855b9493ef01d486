"""The `pipeline` job: the whole experiment, stage after stage, in one workdir.

    edge -> teacher -> label -> switcher -> hybrid -> adapt     (config.stage_order)

Each stage runs its own job on its own config (`config.stages.<name>`) in
`WORKDIR/<name>/`, with the shared `data`, `seed` and `num_devices`, and with its inputs
pointed at the earlier stages' outputs. Every job resumes, so the pipeline does too:
started again after a kill, finished stages only re-check their results and the
interrupted stage continues where it stopped. `WORKDIR/summary.json` gathers each
stage's headline figures.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from dmd_jax import parallel, reporting
from dmd_jax.jobs import adapt, hybrid, label, switcher, train

JOBS = {"train": train.run, "label": label.run, "train_switcher": switcher.run,
        "evaluate_hybrid": hybrid.run, "adapt": adapt.run}
HEADLINES = ("eval_accuracy", "steps", "examples_per_sec", "param_fingerprint", "num_labelled",
             "agreement_rate", "switcher_auroc", "edge_accuracy", "cloud_accuracy",
             "operating_point", "mpc", "upload")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    reporting.ensure_workdir(workdir)
    reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    missing = [name for name in config.stage_order if name not in config.stages]
    if missing:
        raise ValueError(f"config.stage_order names stages {missing} that config.stages lacks; "
                         f"it has {sorted(config.stages)}")
    summary: dict[str, Any] = {"stages": {}}
    for name in config.stage_order:
        stage = stage_config(config, name, workdir)
        reporting.log(f"[pipeline] stage {name}: job {stage.job} in {workdir}/{name}")
        start = time.perf_counter()
        result = JOBS[stage.job](stage, os.path.join(workdir, name))
        summary["stages"][name] = {k: result[k] for k in HEADLINES if k in result}
        summary["stages"][name]["seconds"] = time.perf_counter() - start
    if "hybrid" in summary["stages"]:
        summary.update(summary["stages"]["hybrid"])
    summary["devices"] = parallel.describe()
    reporting.write_json(os.path.join(workdir, "summary.json"), summary)
    if parallel.is_main_process():
        reporting.write_atomic(os.path.join(workdir, "REPORT.md"), report(summary, workdir))
    reporting.log(f"[pipeline] done: {os.path.join(workdir, 'REPORT.md')}")
    return summary


def report(summary: dict[str, Any], workdir: str) -> str:
    """REPORT.md: what ran, the models, the hybrid system, the routers, adaptation."""
    lines = [f"# dmd_jax pipeline report: `{workdir}`", "",
             f"Ran on {summary['devices']}.", "",
             "| stage | headline | seconds |", "|---|---|---|"]
    for name, stage in summary["stages"].items():
        headline = ", ".join(f"{k} {_short(v)}" for k, v in stage.items()
                             if k not in ("seconds", "operating_point", "param_fingerprint",
                                          "mpc", "upload"))
        lines.append(f"| {name} | {headline} | {stage['seconds']:.0f} |")
    hybrid_dir = os.path.join(workdir, "hybrid")
    if "hybrid" in summary["stages"]:
        with open(os.path.join(hybrid_dir, "summary.json")) as f:
            result = json.load(f)
        point = result["operating_point"]
        lines += ["", "## Edge, cloud and the hybrid system (test split)", "",
                  "| system | accuracy | GFLOPs per clip | offload rate |", "|---|---|---|---|",
                  f"| edge only | {result['edge_accuracy']:.4f} | "
                  f"{point['edge_gflops_per_clip']:.4f} | 0 |",
                  f"| cloud only | {result['cloud_accuracy']:.4f} | "
                  f"{point['cloud_gflops_per_clip']:.4f} | 1 |",
                  f"| hybrid (DMD switcher) | {point['accuracy']:.4f} | "
                  f"{point['gflops_per_clip']:.4f} | {point['offload_rate']:.3f} |",
                  "", "## Routers", "", hybrid.markdown(result),
                  "![deferral curves](hybrid/deferral.png)", ""]
    if "adapt" in summary["stages"]:
        with open(os.path.join(workdir, "adapt", "summary.json")) as f:
            result = json.load(f)
        lines += ["## Online adaptation under corruptions (edge adapted; CEMA's cloud is the "
                  "teacher)", "", *adapt.headline_table(result), "",
                  "Per corruption: `adapt/report.md`.",
                  "![accuracy vs upload](adapt/accuracy_vs_upload.png)", ""]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_config(config: ml_collections.ConfigDict, name: str,
                 workdir: str) -> ml_collections.ConfigDict:
    """`config.stages[name]` with the shared settings and the earlier stages' paths."""
    stage = ml_collections.ConfigDict(config.stages[name].to_dict())
    # Shared data; a stage may change its clip shape (`stages.edge.data.frames=13`).
    overrides = stage.data.to_dict() if "data" in stage else {}
    stage.data = ml_collections.ConfigDict({**config.data.to_dict(), **overrides})
    stage.seed, stage.num_devices = config.seed, config.num_devices
    if stage.job not in JOBS:
        raise ValueError(f"config.stages.{name}.job={stage.job!r} is not a job; available: "
                         f"{sorted(JOBS)}")
    stage.edge.path = os.path.join(workdir, "edge", "model")
    if "teacher" in config.stage_order:  # else the config's cloud (e.g. zero-shot X-CLIP)
        stage.cloud.path = os.path.join(workdir, "teacher", "model")
    stage.switcher.label_dir = stage.hybrid.label_dir = os.path.join(workdir, "label")
    stage.hybrid.switcher_dir = os.path.join(workdir, "switcher")
    return stage
