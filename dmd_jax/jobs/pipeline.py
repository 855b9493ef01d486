"""The `pipeline` job: the whole experiment, stage after stage, in one workdir.

    edge -> teacher -> label -> switcher -> hybrid -> adapt     (config.stage_order)

Each stage runs its own job on its own config (`config.stages.<name>`) in
`WORKDIR/<name>/`, with the shared `data` and `runtime` (for the jobs that read them),
`seed`, `num_devices` and `overwrite`, and with its inputs pointed at the earlier stages'
outputs. Every job resumes, so the pipeline does too:
started again after a kill, finished stages only re-check their results and the
interrupted stage continues where it stopped. `WORKDIR/summary.json` gathers each
stage's headline figures.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections

from dmd_jax import config_utils, files, jobs, parallel, reporting

SECTIONS = ("data", "runtime", "stage_order", "stages")
KEYS: dict[str, tuple[str, ...]] = {}  # each stage is checked against its own job's
SHARED = ("data", "runtime")  # given to every stage whose job reads them
HEADLINES = ("eval_accuracy", "steps", "examples_per_sec", "param_fingerprint", "num_labelled",
             "agreement_rate", "switcher_auroc", "edge_accuracy", "cloud_accuracy",
             "operating_point", "mpc", "upload")


@jobs.entry("pipeline", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    missing = [name for name in config.stage_order if name not in config.stages]
    if missing:
        raise config_utils.ConfigSectionError(
            f"config.stage_order names stages {missing} that config.stages lacks; it has "
            f"{sorted(config.stages)}")
    staged = {name: stage_config(config, name, workdir) for name in config.stage_order}
    skipped = sorted(set(config.stages) - set(config.stage_order))
    if skipped:  # `--config.stage_order=...` runs part of a pipeline; say what is left out
        reporting.log(f"[pipeline] skipping stages {skipped} (not in config.stage_order)")
    summary: dict[str, Any] = {"stages": {}}
    for name, stage in staged.items():
        reporting.log(f"[pipeline] stage {name}: job {stage.job} in {workdir}/{name}")
        start = time.perf_counter()
        result = jobs.module(stage.job).run(stage, os.path.join(workdir, name))
        summary["stages"][name] = {k: result[k] for k in HEADLINES if k in result}
        summary["stages"][name]["seconds"] = time.perf_counter() - start
    if "hybrid" in summary["stages"]:
        summary.update(summary["stages"]["hybrid"])
    summary["devices"] = parallel.describe()
    # Written when every stage has run: a stage that refuses (its stamp) changes nothing.
    files.write_json(files.path(workdir) / "config.json", config.to_dict())
    files.write_json(files.path(workdir) / "summary.json", summary)
    if parallel.is_main_process():
        files.write_text(files.path(workdir) / "REPORT.md", report(summary, workdir))
    reporting.log(f"[pipeline] done: {os.path.join(workdir, 'REPORT.md')}")
    return summary


def report(summary: dict[str, Any], workdir: str) -> str:
    """REPORT.md: what ran, the models, the hybrid system, the routers, adaptation."""
    lines = [f"# dmd_jax pipeline report: `{workdir}`", "",
             reporting.devices_sentence(summary.get("devices")), "",
             "| stage | headline | seconds |", "|---|---|---|"]
    for name, stage in summary["stages"].items():
        headline = ", ".join(f"{k} {_short(v)}" for k, v in stage.items()
                             if k not in ("seconds", "operating_point", "param_fingerprint",
                                          "mpc", "upload"))
        lines.append(f"| {name} | {headline} | {stage['seconds']:.0f} |")
    hybrid_dir = os.path.join(workdir, "hybrid")
    if "hybrid" in summary["stages"]:
        result = files.read_json(os.path.join(hybrid_dir, "summary.json"))
        point = result["operating_point"]
        lines += ["", "## Edge, cloud and the hybrid system (test split)", "",
                  "| system | accuracy | GFLOPs per clip | offload rate |", "|---|---|---|---|",
                  f"| edge only | {result['edge_accuracy']:.4f} | "
                  f"{point['edge_gflops_per_clip']:.4f} | 0 |",
                  f"| cloud only | {result['cloud_accuracy']:.4f} | "
                  f"{point['cloud_gflops_per_clip']:.4f} | 1 |",
                  f"| hybrid (DMD switcher) | {point['accuracy']:.4f} | "
                  f"{point['gflops_per_clip']:.4f} | {point['offload_rate']:.3f} |",
                  "", "## Routers", "", jobs.module("evaluate_hybrid").markdown(result),
                  "![deferral curves](hybrid/deferral.png)", ""]
    if "adapt" in summary["stages"]:
        result = files.read_json(os.path.join(workdir, "adapt", "summary.json"))
        lines += ["## Online adaptation under corruptions (edge adapted; CEMA's cloud is the "
                  "teacher)", "", *jobs.module("adapt").headline_table(result), "",
                  "Per corruption: `adapt/report.md`.",
                  "![accuracy vs upload](adapt/accuracy_vs_upload.png)", ""]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_config(config: ml_collections.ConfigDict, name: str,
                 workdir: str) -> ml_collections.ConfigDict:
    """`config.stages[name]` with the shared settings and the earlier stages' paths,
    checked against the sections its job reads."""
    stage = ml_collections.ConfigDict(config.stages[name].to_dict())
    if stage.get("job") not in jobs.JOBS or stage.job == "pipeline":
        raise config_utils.ConfigSectionError(
            f"config.stages.{name}.job={stage.get('job')!r} is not a stage's job; available: "
            f"{sorted(j for j in jobs.JOBS if j != 'pipeline')}")
    sections = jobs.module(stage.job).SECTIONS
    for shared in SHARED:
        if shared in sections:  # a stage may change part of it (`stages.edge.data.frames`)
            own = stage[shared].to_dict() if shared in stage else {}
            stage[shared] = ml_collections.ConfigDict({**config[shared].to_dict(), **own})
    for key in ("seed", "num_devices", "overwrite"):
        stage[key] = config.get(key, False if key == "overwrite" else 0)
    config_utils.check_sections(stage, stage.job, sections, where=f"config.stages.{name}",
                                keys=jobs.module(stage.job).KEYS)
    if "edge" in stage:
        stage.edge.path = os.path.join(workdir, "edge", "model")
    if "cloud" in stage and "teacher" in config.stage_order:  # else the config's own cloud
        stage.cloud.path = os.path.join(workdir, "teacher", "model")
    if "switcher" in stage:
        stage.switcher.label_dir = os.path.join(workdir, "label")
    if "hybrid" in stage:
        stage.hybrid.label_dir = os.path.join(workdir, "label")
        stage.hybrid.switcher_dir = os.path.join(workdir, "switcher")
    for offloading in ("dmd", "dmd_cema"):  # the adapt job's offloading methods
        if offloading in stage.get("adapt", {}):
            stage.adapt[offloading].update(
                switcher_dir=os.path.join(workdir, "switcher"),
                operating_point=os.path.join(workdir, "hybrid", "operating_point.json"))
    return stage
