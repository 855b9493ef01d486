"""The `adapt` job: online adaptation of the edge under corrupted video (METHODS.md §2-4).

For every method of `config.adapt.methods` and every stream of the protocol (`reset`:
one per corruption x severity, models reset before each; `continual`; `mixed`), the
corrupted test split flows through the method batch by batch. Methods are found by
name (`dmd_jax.tta`: a module per method, variants as config). Accuracy counts the
predictions each method made *before* that batch changed it. Per stream it saves the
per-clip predictions (`WORKDIR/<protocol>/<method>/<stream>.npz`, written atomically,
with the stamp of what made it: a killed job started again skips the streams on disk
that this run would make, and refuses, or with `overwrite` recomputes, those made with
other settings), and at the end `summary.json`, `report.md` (accuracy per corruption,
mPC, rPC, upload and bytes) and `accuracy_vs_upload.png`.

Stability: after a method has adapted, a batch with non-finite outputs or loss, or whose
predictions collapse onto one class (`collapse_fraction` of the batch), resets the
method to the source model. Every such reset is logged and counted in the summary.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from dmd_jax import files, jobs, model_store, parallel, reporting, stamps, tta
from dmd_jax.data import pipeline, streams
from dmd_jax.errors import check_positive
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import BatchResult, Context, Method

SECTIONS = ("data", "edge", "cloud", "adapt", "runtime")
KEYS = {"edge": ("path",), "cloud": ("path",)}  # config.adapt: `tta.check`
# The stream settings that determine a stream's outcome (with the method's own settings).
_STREAM_KEYS = ("split", "protocol", "severities", "batch_size", "seed", "collapse_fraction")


@jobs.entry("adapt", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.adapt
    check_positive(cfg, ("batch_size",), "config.adapt")
    check_positive(cfg, ("log_every",), "config.adapt", minimum=0)
    tta.check(cfg)
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)

    builder = pipeline.prepare(config.data)
    split = pipeline.open_split(builder, config.data, cfg.split)
    edge_model = model_store.load(config.edge.path, "edge", config.runtime,
                                  class_names=split.class_names)
    edge = Adaptable.of(edge_model)
    reader = streams.StreamReader(split, cfg.batch_size, mesh, cfg.seed)
    stream_list = streams.make_streams(cfg.protocol, len(split), tuple(cfg.corruptions),
                                       tuple(cfg.severities), cfg.batch_size, cfg.seed)
    identity = {"data": pipeline.dataset_identity(builder, config.data),
                "runtime": stamps.canonical(config.runtime),
                "edge": edge_model.fingerprint,
                "cloud": model_store.stored_fingerprint(config.cloud.path)}
    overwrite = config.get("overwrite", False)
    # Every stream on disk is checked against this run's stamps before anything is
    # written: a refused run leaves the workdir as it was (config.json included).
    saved = {(name, stream.name): _saved_stream(
                 _stream_path(workdir, cfg, name, stream), stream_stamp(cfg, name, stream, identity),
                 f"{name} stream {stream.name}", overwrite)
             for name in cfg.methods for stream in stream_list}
    files.write_json(files.path(workdir) / "config.json", config.to_dict())

    clean = _clean_accuracy(edge, split, cfg, mesh, workdir, identity, overwrite)
    results: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for name in cfg.methods:
        method = None  # built on first need: a finished method costs nothing to resume
        results[name] = {}
        for stream in stream_list:
            path = _stream_path(workdir, cfg, name, stream)
            stamp = stream_stamp(cfg, name, stream, identity)
            if saved[name, stream.name] is not None:
                results[name][stream.name] = saved[name, stream.name]
                continue
            method = method or tta.build(cfg, name, edge, _context(config, name, builder, mesh))
            method.reset()
            outcome = run_stream(method, stream, reader, cfg)
            files.save_npz(path, **outcome, stamp=np.asarray(json.dumps(stamp)))
            results[name][stream.name] = outcome
            _log_stream(name, stream.name, outcome)

    summary = summarize(results, clean, cfg)
    summary["devices"] = parallel.describe()
    files.write_json(files.path(workdir) / "summary.json", summary)
    files.write_text(files.path(workdir) / "report.md", markdown(summary))
    _plot(os.path.join(workdir, "accuracy_vs_upload.png"), summary)
    reporting.log(f"[adapt] done: {os.path.join(workdir, 'report.md')}")
    return summary


def _stream_path(workdir: str, cfg: ml_collections.ConfigDict, name: str,
                 stream: streams.Stream):
    return files.path(workdir) / cfg.protocol / name / f"{stream.name}.npz"


def stream_stamp(cfg: ml_collections.ConfigDict, name: str, stream: streams.Stream,
                 identity: dict[str, Any]) -> dict[str, Any]:
    """What a stream's outcome depends on: the method's settings, the stream settings,
    the corruptions it meets (its own for `reset`, all for the joined protocols), the
    models and the data."""
    implementation, settings = tta.method_settings(cfg, name)
    corruptions = (list(stream.corruption_names) if cfg.protocol != "reset"
                   else [stream.name.split("@")[0]])
    return stamps.make(
        {"method": {"name": name, "implementation": implementation, "settings": settings},
         "stream": {**{k: cfg[k] for k in _STREAM_KEYS}, "corruptions": corruptions},
         "data": identity["data"], "runtime": identity["runtime"]},
        {"edge": identity["edge"], "cloud": identity["cloud"]})


def _saved_stream(path, stamp: dict[str, Any], what: str,
                  overwrite: bool) -> dict[str, np.ndarray] | None:
    """The stream's saved outcome if its stamp matches this run's; None to (re)compute."""
    exists = bool(parallel.broadcast_from_main(np.asarray(files.exists(path))))
    if not exists:
        return None
    saved = files.load_npz(path)  # every host reads it: all of them summarise
    old = json.loads(str(saved.pop("stamp"))) if "stamp" in saved else None
    if stamps.check(old, stamp, what, str(path), overwrite, has_results=True):
        return saved
    return None


def _context(config: ml_collections.ConfigDict, name: str, builder, mesh) -> Context:
    """What method `name` may ask the job for: the cloud model, clean clips."""
    cfg = config.adapt

    def foundation() -> Adaptable:
        return Adaptable.of(model_store.load(config.cloud.path, "cloud", config.runtime,
                                             class_names=builder.info.features["label"].names))

    def clean_batches(split_name: str, clips: int):
        clean = pipeline.open_split(builder, config.data, split_name)
        count = min(clips, len(clean))
        count -= count % cfg.batch_size
        rows = parallel.host_slice(cfg.batch_size)
        for start in range(0, count, cfg.batch_size):
            batch = clean.rows(np.arange(start, start + cfg.batch_size)[rows])
            yield parallel.to_global(batch["video"], mesh)

    return Context(name=name, mesh=mesh, seed=cfg.seed, batch_size=cfg.batch_size,
                   foundation=foundation, clean_batches=clean_batches)


def _clean_accuracy(edge: Adaptable, split: pipeline.Split, cfg: ml_collections.ConfigDict,
                    mesh, workdir: str, identity: dict[str, Any], overwrite: bool) -> float:
    """The source model's accuracy on the uncorrupted stream clips: rPC's denominator."""
    path = files.path(workdir) / "clean_source.npz"
    stamp = stamps.make({"split": cfg.split, "batch_size": cfg.batch_size, "seed": cfg.seed,
                         "data": identity["data"], "runtime": identity["runtime"]},
                        {"edge": identity["edge"]})
    # Every host must take the same branch (the forward passes are collective), and only
    # the main host writes: decide on its view of the disk, use the in-memory result.
    saved = _saved_stream(path, stamp, "clean accuracy", overwrite)
    if saved is None:
        source = tta.build(cfg, "source", edge, Context("source", mesh, cfg.seed,
                                                        cfg.batch_size, None, None))
        order = streams.clip_order(len(split), cfg.batch_size, cfg.seed)  # the streams' clips
        rows = parallel.host_slice(cfg.batch_size)
        predictions, labels = [], []
        for start in range(0, len(order), cfg.batch_size):
            host = split.rows(order[start:start + cfg.batch_size][rows])
            logits = source.process(parallel.to_global(host["video"], mesh)).logits
            predictions.append(logits.argmax(-1))
            labels.append(parallel.gather_host_rows(host["label"]))
        saved = {"prediction": np.concatenate(predictions), "label": np.concatenate(labels)}
        files.save_npz(path, **saved, stamp=np.asarray(json.dumps(stamp)))
    return float(np.mean(saved["prediction"] == saved["label"]))


def run_stream(method: Method, stream: streams.Stream, reader: streams.StreamReader,
               cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """One stream through one method; per-clip and per-batch records of what happened."""
    rows: dict[str, list[np.ndarray]] = {k: [] for k in (
        "id", "label", "corruption", "severity", "prediction", "uploaded", "learned_from")}
    batches: dict[str, list[Any]] = {k: [] for k in (
        "loss", "bytes_up", "bytes_down", "cloud_steps", "self_resets", "stability_reset")}
    adapted, start, num_batches = False, time.perf_counter(), len(stream) // cfg.batch_size
    before = None  # how concentrated the predictions were before adaptation began
    for b, (clips, info) in enumerate(reader.batches(stream)):
        result = method.process(clips)
        if before is None:
            before = top_class_fraction(result.logits)
        for key in ("id", "label", "corruption", "severity"):
            rows[key].append(info[key])
        rows["prediction"].append(result.logits.argmax(-1))
        rows["uploaded"].append(result.uploaded)
        rows["learned_from"].append(result.learned_from)
        for name, mask in (result.filter_failed or {}).items():  # CEMA's upload filters
            rows.setdefault(f"failed_{name}", []).append(mask)
        for key in ("loss", "bytes_up", "bytes_down", "cloud_steps", "self_resets"):
            batches[key].append(getattr(result, key))
        problem = health_problem(result, adapted, cfg.collapse_fraction, before)
        if problem:
            reporting.log(f"[adapt] {method.name} {stream.name} batch {b}: {problem}; "
                          "resetting to the source model")
            method.reset()
            adapted, before = False, None
        else:
            adapted = (adapted or result.updated) and not result.self_resets
        batches["stability_reset"].append(problem or "")
        if cfg.log_every and (b + 1) % cfg.log_every == 0 and b + 1 < num_batches:
            rate = (b + 1) * cfg.batch_size / (time.perf_counter() - start)
            reporting.log(f"[adapt] {method.name} {stream.name}: batch {b + 1}/{num_batches}  "
                          f"{rate:.0f} clips/s  ETA {(num_batches - b - 1) * cfg.batch_size / rate:.0f}s")
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["condition"] = stream.row_names()
    out.update({k: np.asarray(v) for k, v in batches.items()})
    out["seconds"] = np.asarray(time.perf_counter() - start)
    return out


def health_problem(result: BatchResult, adapted: bool, collapse_fraction: float,
                   before: float) -> str | None:
    """Why the adapted model must be reset, or None: a non-finite loss or outputs, or a
    collapse the adaptation caused: at least `collapse_fraction` of the batch predicted
    as one class when, before adapting (`before`: that fraction on the stream's first
    batch since the last reset), the model's predictions were more spread out."""
    if result.updated and not np.isfinite(result.loss):
        return f"non-finite adaptation loss ({result.loss})"
    if not adapted:
        return None
    if not np.all(np.isfinite(result.logits)):
        return "non-finite predictions"
    top = top_class_fraction(result.logits)
    if top >= collapse_fraction > before:
        return (f"collapse: {top:.0%} of the batch predicted as one class "
                f"({before:.0%} before adapting)")
    return None


def top_class_fraction(logits: np.ndarray) -> float:
    """The fraction of the batch predicted as its most frequent class."""
    predictions = np.nan_to_num(logits, nan=0.0).argmax(-1)
    return float(np.bincount(predictions).max() / len(predictions))


def summarize(results: dict[str, dict[str, dict[str, np.ndarray]]], clean_accuracy: float,
              cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Per method: per corruption x severity and averaged (mPC, rPC) figures."""
    methods = {}
    for name, per_stream in results.items():
        rows = _rows_by_condition(per_stream)
        conditions = {cond: _condition_stats(r) for cond, r in rows.items()}
        mean = lambda key: float(np.mean([c[key] for c in conditions.values()]))
        total = lambda key: float(sum(c[key] for c in conditions.values()))
        methods[name] = {
            "accuracy": mean("accuracy"),  # mPC over the corruptions x severities
            "rpc": mean("accuracy") / clean_accuracy if clean_accuracy else None,
            "upload_fraction": mean("upload_fraction"),
            "learned_from_fraction": mean("learned_from_fraction"),
            "bytes_up": total("bytes_up"),
            "bytes_down": total("bytes_down"),
            "cloud_steps": total("cloud_steps"),
            "stability_resets": int(sum(np.count_nonzero(s["stability_reset"])
                                        for s in per_stream.values())),
            "self_resets": int(sum(s["self_resets"].sum() for s in per_stream.values())),
            "seconds": float(sum(s["seconds"] for s in per_stream.values())),
            "stream_clips_per_sec": float(sum(len(s["id"]) for s in per_stream.values())
                                          / sum(s["seconds"] for s in per_stream.values())),
            "corruptions": conditions,
        }
        if all("rejected" in c for c in conditions.values()):
            methods[name]["rejected"] = {
                k: float(np.mean([c["rejected"][k] for c in conditions.values()]))
                for k in next(iter(conditions.values()))["rejected"]}
    return {"mpc": {name: m["accuracy"] for name, m in methods.items()},
            "upload": {name: m["upload_fraction"] for name, m in methods.items()},
            "protocol": cfg.protocol, "severities": list(cfg.severities),
            "corruptions": list(cfg.corruptions), "batch_size": cfg.batch_size,
            "clean_accuracy": clean_accuracy, "methods": methods,
            "settings": {**{name: tta.method_settings(cfg, name)[1] for name in results},
                         "collapse_fraction": cfg.collapse_fraction}}


def _rows_by_condition(per_stream: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Every clip row of every stream, grouped by `corruption@severity`. Per-batch bytes
    and cloud steps are shared out evenly over the batch's rows."""
    grouped: dict[str, list[dict[str, np.ndarray]]] = {}
    for s in per_stream.values():
        batch = len(s["id"]) // len(s["loss"])
        per_row = {k: np.repeat(s[k] / batch, batch) for k in ("bytes_up", "bytes_down", "cloud_steps")}
        names = s["condition"]
        for cond in np.unique(names):
            keep = names == cond
            columns = ("label", "prediction", "uploaded", "learned_from", *_failed_columns(s))
            part = {k: s[k][keep] for k in columns}
            part.update({k: v[keep] for k, v in per_row.items()})
            grouped.setdefault(str(cond), []).append(part)
    # Columns every stream has (streams saved before filter failures were recorded lack them).
    return {c: {k: np.concatenate([p[k] for p in parts])
                for k in set.intersection(*(set(p) for p in parts))}
            for c, parts in sorted(grouped.items())}


def _failed_columns(rows: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Per-filter rejections a method recorded (CEMA's upload filters)."""
    return tuple(sorted(k for k in rows if k.startswith("failed_")))


def _condition_stats(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    stats = {"accuracy": float(np.mean(rows["prediction"] == rows["label"])),
             "upload_fraction": float(np.mean(rows["uploaded"])),
             "learned_from_fraction": float(np.mean(rows["learned_from"])),
             "bytes_up": float(rows["bytes_up"].sum()),
             "bytes_down": float(rows["bytes_down"].sum()),
             "cloud_steps": float(rows["cloud_steps"].sum()),
             "num_clips": int(len(rows["label"]))}
    if _failed_columns(rows):  # CEMA: the fraction each upload filter turned down, on its own
        stats["rejected"] = {k.removeprefix("failed_"): float(np.mean(rows[k]))
                             for k in _failed_columns(rows)}
    return stats


def _log_stream(name: str, stream: str, outcome: dict[str, np.ndarray]) -> None:
    accuracy = np.mean(outcome["prediction"] == outcome["label"])
    resets = np.count_nonzero(outcome["stability_reset"])
    reporting.log(f"[adapt] {name:<16} {stream:<22} accuracy {accuracy:.3f}  upload "
                  f"{np.mean(outcome['uploaded']):.1%}  cloud steps {outcome['cloud_steps'].sum()}"
                  f"  {len(outcome['id']) / float(outcome['seconds']):.0f} clips/s"
                  + (f"  {resets} stability resets" if resets else ""))


def headline_table(summary: dict[str, Any]) -> list[str]:
    """One row per method: mPC, rPC, upload, bytes, cloud steps, resets, speed."""
    lines = [
        f"Protocol `{summary['protocol']}`, severities {summary['severities']}, corruptions "
        f"{len(summary['corruptions'])}, stream batch {summary['batch_size']}. Accuracy is of "
        "the predictions each method made before adapting on the batch. mPC: mean accuracy "
        "over the corruptions; rPC: mPC / the source model's clean accuracy "
        f"({summary['clean_accuracy']:.3f}). Upload: fraction of the stream's clips sent to "
        "the cloud (CEMA); learned from: fraction the adaptation used.", "",
        "| method | mPC | rPC | upload | learned from | MB up | KB down | cloud steps | "
        "stability resets | clips/s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {m['accuracy']:.4f} | {m['rpc']:.3f} | {m['upload_fraction']:.1%} | "
            f"{m['learned_from_fraction']:.1%} | {m['bytes_up'] / 1e6:.2f} | "
            f"{m['bytes_down'] / 1e3:.1f} | {m['cloud_steps']:.0f} | {m['stability_resets']} | "
            f"{m['stream_clips_per_sec']:.0f} |")
    for name, m in summary["methods"].items():
        if m.get("rejected"):
            turned_down = ", ".join(f"{k} {v:.1%}" for k, v in m["rejected"].items())
            lines += ["", f"{name}'s upload filters turned down (each on its own, a clip can "
                      f"fail several): {turned_down} of the stream."]
    return lines


def markdown(summary: dict[str, Any]) -> str:
    """report.md: the headline table, accuracy per corruption, the settings."""
    methods = summary["methods"]
    conditions = sorted(next(iter(methods.values()))["corruptions"])
    lines = ["# Online adaptation under corruptions", "",
             f"Ran on {summary.get('devices')}.", "", *headline_table(summary)]
    lines += ["", "## Accuracy per corruption", "",
              "| corruption | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for cond in conditions:
        cells = [f"{methods[m]['corruptions'][cond]['accuracy']:.3f}" for m in methods]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    lines += ["", "## Settings", "", "```", _settings(summary["settings"]), "```", "",
              "![accuracy vs upload](accuracy_vs_upload.png)", ""]
    return "\n".join(lines)


def _settings(settings: dict[str, Any]) -> str:
    return "\n".join(f"{group}: {values}" for group, values in settings.items())


def _plot(path: str, summary: dict[str, Any]) -> None:
    plt = reporting.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, m in summary["methods"].items():
        marker = "*" if name.startswith("cema") else "o"
        ax.plot([m["upload_fraction"]], [m["accuracy"]], marker, ms=12 if marker == "*" else 8,
                label=name)
        ax.annotate(name, (m["upload_fraction"], m["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("upload fraction of the stream")
    ax.set_ylabel("mPC (accuracy under corruption)")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    files.save_figure(fig, path)
