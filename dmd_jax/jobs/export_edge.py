"""The `export_edge` job: the edge model and its router as one ONNX artifact for a CPU
device that runs no JAX (the format: `dmd_jax.deploy`), checked against JAX.

    python -m dmd_jax.main --config configs/demo.py:export_edge --workdir runs/demo/export_edge

The router and threshold are the operating point's (`edge.operating_point`, written by
`evaluate_hybrid`; a switcher from `edge.switcher_dir`). `export.normalization` is how the
deployed edge normalises: 'batch' (each batch's own statistics: the edge of CEMA, Tent and
Norm) or 'running' (running statistics, themselves inputs: the source model, or CEMA with
batch renormalisation). The normalisation parameters are inputs of the graph, so CEMA's
downloads swap in without a new export (`runtime.DeployedEdge.apply`).

With `export.int8` an int8 graph is made too (ONNX Runtime's static QDQ quantisation, its
ranges calibrated on `export.calibration_clips` clips of `export.calibration_split`). Then
both graphs run on `export.check_clips` clean clips of `export.check_split` in batches of
`export.batch_size`, next to JAX: the fp32 graph's logits and scores must be within
`export.tolerance` of JAX (else the job stops, the manifest unwritten); for int8 the
summary gives its accuracy, its agreement with fp32 and its offload decisions' agreement.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dmd_jax import files, hybrid, jobs, model_store, reporting, stamps
from dmd_jax.data import pipeline, views
from dmd_jax.deploy import export, runtime
from dmd_jax.errors import ConfigValueError, UserError, check_positive
from dmd_jax.tta.adaptable import Adaptable

# This job's computation version (`stamps.make`): bump it when its results would change
# for the same settings and inputs, so that results made by older code are not reused.
STAMP_VERSION = 1
SECTIONS = ("data", "edge", "export", "runtime")
KEYS = {"edge": ("path", "switcher_dir", "operating_point"),
        "export": ("normalization", "int8", "calibration_split", "calibration_clips",
                   "check_split", "check_clips", "batch_size", "tolerance")}


class ExportMismatchError(UserError, RuntimeError):
    """The exported graph does not compute what the JAX edge computes."""


@jobs.entry("export_edge", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.export
    _check(config)
    edge = model_store.load(config.edge.path, "edge", config.runtime)
    router, threshold = hybrid.load_router(config.edge.operating_point,
                                           config.edge.switcher_dir, edge.fingerprint)
    builder = pipeline.prepare(config.data)
    stamp = stamps.make(cfg.to_dict(), {"edge": edge.fingerprint, "router": router.spec,
                                        "router_fingerprint": router.fingerprint,
                                        "threshold": str(threshold),
                                        "data": pipeline.dataset_identity(builder, config.data)},
                        STAMP_VERSION)
    calibration = (_clips(builder, config, cfg.calibration_split, cfg.calibration_clips)["video"]
                   if cfg.int8 else None)
    check = _clips(builder, config, cfg.check_split, cfg.check_clips)
    summary_path = files.path(workdir) / "summary.json"
    finished = files.exists(summary_path)  # written last: a killed export is redone
    if stamps.claim(workdir, stamp, "the exported edge", config.overwrite, finished,
                    functools.partial(_clear, workdir)) and finished:
        reporting.log(f"[export_edge] {workdir} holds this export already")
        return files.read_json(summary_path)
    manifest = export.export(edge, router, threshold, workdir,
                             normalization=cfg.normalization, calibration=calibration,
                             batch_size=cfg.batch_size, stamp=stamp)
    summary = {"manifest": manifest,
               **compare(edge, router, threshold, workdir, check, cfg)}
    files.write_text(files.path(workdir) / "report.md", markdown(summary))
    files.write_json(summary_path, summary)
    reporting.log(markdown(summary))
    return summary


def compare(edge: model_store.LoadedModel, router, threshold: float, directory: str,
            check: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The artifact's graphs against JAX on the same batches; raises when fp32 differs
    by more than `cfg.tolerance`."""
    batches = [slice(i, i + cfg.batch_size) for i in range(0, len(check["label"]), cfg.batch_size)]
    reference = jax_outputs(edge, router, cfg.normalization, check["video"], batches)
    out: dict[str, Any] = {"check_clips": int(len(check["label"])),
                           "jax": _scores(reference, check["label"], threshold)}
    for variant in manifest_variants(directory):
        deployed = runtime.DeployedEdge(directory, variant)
        answers = [deployed.predict(check["video"][b]) for b in batches]
        outputs = {"logits": np.concatenate([a.logits for a in answers]),
                   "scores": np.concatenate([a.scores for a in answers])}
        row = _scores(outputs, check["label"], threshold)
        row.update(max_logit_diff=float(np.abs(outputs["logits"] - reference["logits"]).max()),
                   max_score_diff=float(np.abs(outputs["scores"] - reference["scores"]).max()),
                   agreement_with_jax=float(np.mean(outputs["logits"].argmax(-1) ==
                                                    reference["logits"].argmax(-1))),
                   offload_agreement_with_jax=float(np.mean(
                       (outputs["scores"] < threshold) == (reference["scores"] < threshold))))
        out[variant] = row
    worst = max(out["fp32"]["max_logit_diff"], out["fp32"]["max_score_diff"])
    if not worst <= cfg.tolerance:
        files.remove(files.path(directory) / runtime.MANIFEST)
        raise ExportMismatchError(
            f"the exported fp32 graph differs from JAX by {worst:.3g} (> export.tolerance="
            f"{cfg.tolerance}) on {len(check['label'])} clips: the export is wrong for this "
            "model (its manifest was removed); please report it with the model's config")
    if "int8" in out:
        out["int8"]["accuracy_loss_vs_fp32"] = out["fp32"]["accuracy"] - out["int8"]["accuracy"]
    return out


def jax_forward(edge: model_store.LoadedModel, router, normalization: str
                ) -> Callable[[np.ndarray], tuple[jax.Array, jax.Array]]:
    """What the deployed edge computes, in JAX: uint8 clips -> `(logits, scores)`, the
    BatchNorm layers normalising as `normalization` says (weights are arguments)."""
    adaptable = Adaptable.of(edge)
    constants, affine = adaptable.constants(), adaptable.source_norm_affine

    @jax.jit
    def forward(variables, norm_affine, constants, router_params, clips):
        if normalization == "batch":
            logits, features = adaptable.outputs(norm_affine, constants, clips)
        else:
            logits, features = edge.apply(variables, clips)
        return logits, router.score(router_params, features, logits)

    return lambda clips: forward(edge.variables, affine, constants, router.params, clips)


def jax_outputs(edge: model_store.LoadedModel, router, normalization: str, clips: np.ndarray,
                batches: list[slice]) -> dict[str, np.ndarray]:
    """`jax_forward` on `clips`, batch by batch (batch statistics depend on the batch)."""
    forward = jax_forward(edge, router, normalization)
    pairs = [jax.device_get(forward(clips[b])) for b in batches]
    return {"logits": np.concatenate([p[0] for p in pairs]),
            "scores": np.concatenate([p[1] for p in pairs])}


def manifest_variants(directory: str) -> list[str]:
    return list(runtime.read_manifest(directory)["files"])


def _scores(outputs: dict[str, np.ndarray], labels: np.ndarray, threshold: float) -> dict:
    return {"accuracy": float(np.mean(outputs["logits"].argmax(-1) == labels)),
            "offload_rate": float(np.mean(outputs["scores"] < threshold))}


def _clips(builder, config: ml_collections.ConfigDict, split: str, count: int
           ) -> dict[str, np.ndarray]:
    opened = pipeline.open_split(builder, config.data, split)
    if len(opened) < count:
        raise ConfigValueError(f"split {split!r} has {len(opened)} clips, fewer than the "
                               f"{count} the export config asks for")
    rows = opened.rows(np.arange(count))
    return {"video": np.asarray(rows["video"]), "label": np.asarray(rows["label"])}


def _check(config: ml_collections.ConfigDict) -> None:
    cfg = config.export
    if cfg.normalization not in runtime.NORMALIZATIONS:
        raise ConfigValueError(f"config.export.normalization={cfg.normalization!r} must be one "
                               f"of {runtime.NORMALIZATIONS}")
    check_positive(cfg, ("calibration_clips", "check_clips", "batch_size"), "config.export")
    if config.runtime.get("dtype", "float32") != "float32":
        raise ConfigValueError(f"config.runtime.dtype={config.runtime.dtype!r}: the deployed "
                               "edge is float32 and checked against float32 JAX; set it to "
                               "'float32' for this job")
    if views.ViewConfig.from_config(config.data).num_eval_views != 1:
        raise ConfigValueError("the deployed edge answers one view per clip: leave "
                               "config.data.views at one test view for this job")


def _clear(workdir: str) -> None:
    for name in (runtime.MANIFEST, runtime.PARAMETERS, "summary.json", "report.md",
                 *export.FILES.values()):
        files.remove(files.path(workdir) / name)


def markdown(summary: dict[str, Any]) -> str:
    manifest = summary["manifest"]
    lines = [f"# Deployed edge ({manifest['normalization']} normalisation, router "
             f"{manifest['router']})", "",
             f"{summary['check_clips']} clean clips; the largest differences from JAX.", "",
             "| runtime | accuracy | offload rate | max logit diff | max score diff | "
             "offload decisions as JAX |", "|---|---|---|---|---|---|",
             f"| JAX | {summary['jax']['accuracy']:.4f} | {summary['jax']['offload_rate']:.3f} "
             "| 0 | 0 | 1 |"]
    for variant in manifest["files"]:
        row = summary[variant]
        lines.append(f"| ONNX Runtime {variant} | {row['accuracy']:.4f} | "
                     f"{row['offload_rate']:.3f} | {row['max_logit_diff']:.2e} | "
                     f"{row['max_score_diff']:.2e} | {row['offload_agreement_with_jax']:.3f} |")
    return "\n".join(lines) + "\n"
