"""The `adapt` job: online adaptation of the edge under corrupted video (METHODS.md §2-4).

For every method of `config.adapt.methods`, every seed of `config.adapt.seeds` (the
stream's order and the corruptions' random keys) and every stream of the protocol
(`dmd_jax.data.streams`: `reset`, `continual`, `gradual`, `mixed`, `correlated[:delta]`),
the corrupted test split flows through the method batch by batch. Methods are found by
name (`dmd_jax.tta`: a module per method, variants as config). Accuracy counts the
predictions each method made *before* that batch changed it.

Per stream it saves the per-clip predictions and per-batch records
(`WORKDIR/<protocol>/<method>/seed<k>/<stream>.npz`, atomically, with the stamp of what
made it). Every `checkpoint_every` batches a stream in progress is saved with the
method's state (parameters, optimiser, CEMA's filters and replay buffer) and its
position (`<stream>.partial`), so a killed job resumes mid-stream and ends with the
results an uninterrupted run gets. Results on disk made with other settings are refused,
or with `overwrite` recomputed. At the end: `summary.json` (per method the mean and
standard deviation over seeds; `differences`, paired bootstrap intervals over clips),
`report.md`, `accuracy_vs_upload.png` and `accuracy_vs_batch.png`.

Stability: after a method has adapted, a batch with non-finite outputs or loss, or whose
predictions collapse onto one class (`collapse_fraction` of the batch), resets the
method to the source model. Every such reset is logged and counted in the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from flax import serialization

from dmd_jax import files, intervals, jobs, model_store, parallel, reporting, stamps, tta
from dmd_jax.data import loader, pipeline, streams
from dmd_jax.errors import ConfigValueError, UserError, check_positive
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import BatchResult, Context, Method

# This job's computation version (`stamps.make`): bump it when its results would change
# for the same settings and inputs, so that results made by older code are not reused.
STAMP_VERSION = 1
SECTIONS = ("data", "edge", "cloud", "adapt", "runtime")
KEYS = {"edge": ("path",), "cloud": ("path",)}  # config.adapt: `tta.check`
# The stream settings that determine a stream's outcome (with the method's own settings
# and the stream's seed).
_STREAM_KEYS = ("split", "protocol", "severities", "batch_size", "collapse_fraction")


@jobs.entry("adapt", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.adapt
    check_positive(cfg, ("batch_size",), "config.adapt")
    check_positive(cfg, ("log_every", "checkpoint_every", "bootstrap_resamples"),
                   "config.adapt", minimum=0)
    tta.check(cfg)
    protocol = streams.Protocol.parse(cfg.protocol)
    seeds = _seeds(cfg)
    pairs, skipped = _differences(cfg)
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)

    builder = pipeline.prepare(config.data)
    split = pipeline.open_split(builder, config.data, cfg.split)
    if split.views.num_eval_views > 1:
        raise ConfigValueError(
            f"the adapt job streams one view per clip (the methods adapt on what the edge "
            f"sees), but config.data.views asks for {split.views.num_eval_views} evaluation "
            "views: set data.views.temporal=1 and spatial=1 for the adapt stage")
    edge_model = model_store.load(config.edge.path, "edge", config.runtime,
                                  class_names=split.class_names)
    edge = Adaptable.of(edge_model)
    labels = split.labels() if protocol.name == "correlated" else np.zeros(len(split), np.int32)
    plans = {seed: streams.make_streams(protocol, labels, tuple(cfg.corruptions),
                                        tuple(cfg.severities), cfg.batch_size, seed)
             for seed in seeds}
    identity = {"data": pipeline.dataset_identity(builder, config.data),
                "runtime": stamps.canonical(config.runtime),
                "edge": edge_model.fingerprint,
                "cloud": model_store.stored_fingerprint(config.cloud.path)}
    overwrite = config.get("overwrite", False)
    jobs_ = [StreamJob(workdir, cfg, protocol, name, seed, stream, identity)
             for name in cfg.methods for seed in seeds for stream in plans[seed]]
    # Every stream on disk (finished or in progress) is checked against this run's stamps
    # before anything is written: a refused run leaves the workdir as it was.
    saved = {job.key: job.saved(overwrite) for job in jobs_}
    files.write_json(files.path(workdir) / "config.json", config.to_dict())

    clean = {seed: _clean_accuracy(edge, split, cfg, seed, mesh, workdir, identity, overwrite)
             for seed in seeds}
    results: dict[str, dict[int, dict[str, dict[str, np.ndarray]]]] = {}
    # Built on first need, one at a time (a CEMA cloud holds the teacher and its buffer):
    # a finished method costs nothing to resume.
    built: tuple[tuple[str, int], Method] | None = None
    for job in jobs_:
        outcome = saved[job.key]
        if outcome is None:
            if built is None or built[0] != (job.name, job.seed):
                built = None
                built = ((job.name, job.seed), tta.build(
                    cfg, job.name, edge, _context(config, job.name, builder, mesh, job.seed)))
            reader = streams.StreamReader(split, cfg.batch_size, mesh, job.seed,
                                          int(config.data.get("workers", 0)))
            outcome = job.run(built[1], reader)
        results.setdefault(job.name, {}).setdefault(job.seed, {})[job.stream.name] = outcome

    summary = summarize(results, clean, cfg, pairs)
    summary["differences_not_computed"] = skipped
    summary["devices"] = parallel.describe()
    files.write_json(files.path(workdir) / "summary.json", summary)
    files.write_text(files.path(workdir) / "report.md", markdown(summary))
    _plot_upload(os.path.join(workdir, "accuracy_vs_upload.png"), summary)
    _plot_batches(os.path.join(workdir, "accuracy_vs_batch.png"), summary)
    reporting.log(f"[adapt] done: {os.path.join(workdir, 'report.md')}")
    return summary


def _seeds(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    seeds = tuple(int(s) for s in cfg.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigValueError(f"config.adapt.seeds={tuple(cfg.seeds)} must name one or more "
                               "distinct seeds, e.g. (0, 1, 2)")
    return seeds


def _differences(cfg: ml_collections.ConfigDict) -> tuple[list[tuple[str, str]], list[str]]:
    """`config.adapt.differences` ('tent-norm', ...): the pairs of methods to compare, and
    the entries naming a method this run does not include (logged and reported as not
    computed, so that narrowing `methods` needs no second edit)."""
    pairs, skipped = [], []
    for spec in cfg.differences:
        a, sep, b = spec.partition("-")
        if not sep or not a or not b:
            raise ConfigValueError(f"config.adapt.differences entry {spec!r} must be 'A-B', "
                                   "two method names of config.adapt.methods")
        if a in cfg.methods and b in cfg.methods:
            pairs.append((a, b))
        else:
            skipped.append(spec)
    if skipped:
        reporting.log(f"[adapt] differences not computed (a method not in config.adapt.methods): "
                      f"{', '.join(skipped)}")
    return pairs, skipped


@dataclasses.dataclass
class StreamJob:
    """One stream through one method under one seed: where it is saved, its stamp, and
    running it with mid-stream checkpoints."""

    workdir: str
    cfg: ml_collections.ConfigDict
    protocol: streams.Protocol
    name: str
    seed: int
    stream: streams.Stream
    identity: dict[str, Any]

    @property
    def key(self) -> tuple[str, int, str]:
        return self.name, self.seed, self.stream.name

    @property
    def path(self):
        return (files.path(self.workdir) / self.protocol.folder / self.name
                / f"seed{self.seed}" / f"{self.stream.name}.npz")

    @property
    def partial_path(self):
        return self.path.with_suffix(".partial")

    @property
    def what(self) -> str:
        return f"{self.name} stream {self.stream.name} (seed {self.seed})"

    def stamp(self) -> dict[str, Any]:
        return stream_stamp(self.cfg, self.name, self.seed, self.stream, self.identity)

    def saved(self, overwrite: bool) -> dict[str, np.ndarray] | None:
        """The finished stream's outcome if its stamp matches; None to (re)compute (a
        checkpoint of the stream in progress made with other settings is refused, or with
        `overwrite` removed, now)."""
        if _exists(self.partial_path):
            old = _read_partial(self.partial_path)["stamp"]
            if not stamps.check(json.loads(old), self.stamp(), f"{self.what} in progress",
                                str(self.partial_path), overwrite, has_results=True):
                if parallel.is_main_process():
                    files.remove(self.partial_path)
        return _saved_stream(self.path, self.stamp(), self.what, overwrite)

    def run(self, method: Method, reader: streams.StreamReader) -> dict[str, np.ndarray]:
        record = StreamRecord.start(self, method)
        if record.position:
            reporting.log(f"[adapt] {self.what}: resuming at batch {record.position} of "
                          f"{len(self.stream) // self.cfg.batch_size}")
        outcome = run_stream(method, self.stream, reader, self.cfg, record,
                             checkpoint=lambda r: r.save(self, method))
        files.save_npz(self.path, **outcome, stamp=np.asarray(json.dumps(self.stamp())))
        if _exists(self.partial_path) and parallel.is_main_process():  # _exists: every host
            files.remove(self.partial_path)
        _log_stream(self.name, f"{self.stream.name} seed {self.seed}", outcome)
        return outcome


def _exists(path) -> bool:
    return bool(parallel.broadcast_from_main(np.asarray(files.exists(path))))


def _read_partial(path) -> dict[str, Any]:
    try:
        return serialization.msgpack_restore(files.path(path).read_bytes())
    except Exception as err:  # a truncated or foreign file: msgpack's errors vary
        raise UserError(f"the stream checkpoint {path} cannot be read ({type(err).__name__}): "
                        "delete it to run that stream from its first batch") from err


@dataclasses.dataclass
class StreamRecord:
    """What a stream has produced so far, and where it stands: the per-clip rows, the
    per-batch records, the stability guard's state and the batch to go on from."""

    rows: dict[str, list[np.ndarray]]
    batches: dict[str, list[Any]]
    position: int = 0  # batches done
    adapted: bool = False
    before: float | None = None  # top-class fraction on the first batch since a reset
    seconds: float = 0.0

    @classmethod
    def empty(cls) -> "StreamRecord":
        rows = {k: [] for k in ("id", "label", "corruption", "severity", "prediction",
                                "uploaded", "learned_from")}
        batches = {k: [] for k in ("loss", "bytes_up", "bytes_down", "cloud_steps",
                                   "self_resets", "stability_reset")}
        return cls(rows, batches)

    @classmethod
    def start(cls, job: StreamJob, method: Method) -> "StreamRecord":
        """A fresh record with `method` reset, or the checkpoint on disk with `method`
        restored to it (a method without `state_dict` starts again)."""
        method.reset()
        if not _exists(job.partial_path) or not hasattr(method, "load_state_dict"):
            return cls.empty()
        saved = _read_partial(job.partial_path)
        method.load_state_dict(saved["method"])
        return cls({k: list(v) for k, v in saved["rows"].items()}, json.loads(saved["batches"]),
                   int(saved["position"]), bool(saved["adapted"]),
                   None if saved["before"] is None else float(saved["before"]),
                   float(saved["seconds"]))

    def save(self, job: StreamJob, method: Method) -> None:
        if not hasattr(method, "state_dict"):
            return
        state = serialization.to_state_dict(method.state_dict())  # on every host (collective)
        if not parallel.is_main_process():
            return
        blob = serialization.msgpack_serialize({
            "stamp": json.dumps(job.stamp()), "position": self.position,
            "adapted": self.adapted, "before": self.before, "seconds": self.seconds,
            "rows": {k: np.stack(v) for k, v in self.rows.items()},
            "batches": json.dumps({k: [_plain(x) for x in v] for k, v in self.batches.items()}),
            "method": state})
        files.write_bytes(job.partial_path, blob)

    def outcome(self, stream: streams.Stream) -> dict[str, np.ndarray]:
        out = {k: np.concatenate(v) for k, v in self.rows.items()}
        out["condition"] = stream.row_names()
        out.update({k: np.asarray(v) for k, v in self.batches.items()})
        out["seconds"] = np.asarray(self.seconds)
        return out


def _plain(x: Any) -> Any:
    """A per-batch record as JSON keeps it (a numpy scalar as the Python number)."""
    return x.item() if isinstance(x, np.generic) else x


def stream_stamp(cfg: ml_collections.ConfigDict, name: str, seed: int, stream: streams.Stream,
                 identity: dict[str, Any]) -> dict[str, Any]:
    """What a stream's outcome depends on: the method's settings, the stream settings and
    seed, the corruptions it meets (its own for per-segment protocols, all for the joined
    ones), the models and the data."""
    implementation, settings = tta.method_settings(cfg, name)
    per_segment = streams.Protocol.parse(cfg.protocol).resets_per_segment
    corruptions = ([stream.name.split("@")[0]] if per_segment
                   else list(stream.corruption_names))
    return stamps.make(
        {"method": {"name": name, "implementation": implementation, "settings": settings},
         "stream": {**{k: cfg[k] for k in _STREAM_KEYS}, "seed": seed,
                    "corruptions": corruptions},
         "data": identity["data"], "runtime": identity["runtime"]},
        {"edge": identity["edge"], "cloud": identity["cloud"]}, STAMP_VERSION)


def _saved_stream(path, stamp: dict[str, Any], what: str,
                  overwrite: bool) -> dict[str, np.ndarray] | None:
    """The stream's saved outcome if its stamp matches this run's; None to (re)compute."""
    if not _exists(path):
        return None
    saved = files.load_npz(path)  # every host reads it: all of them summarise
    old = json.loads(str(saved.pop("stamp"))) if "stamp" in saved else None
    if stamps.check(old, stamp, what, str(path), overwrite, has_results=True):
        return saved
    return None


def _context(config: ml_collections.ConfigDict, name: str, builder, mesh, seed: int) -> Context:
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
        batches = [np.arange(start, start + cfg.batch_size)[rows]
                   for start in range(0, count, cfg.batch_size)]
        for batch in loader.index_batches(clean, batches, int(config.data.get("workers", 0))):
            yield parallel.to_global(batch["video"], mesh)

    return Context(name=name, mesh=mesh, seed=seed, batch_size=cfg.batch_size,
                   foundation=foundation, clean_batches=clean_batches)


def _clean_accuracy(edge: Adaptable, split: pipeline.Split, cfg: ml_collections.ConfigDict,
                    seed: int, mesh, workdir: str, identity: dict[str, Any],
                    overwrite: bool) -> float:
    """The source model's accuracy on the uncorrupted stream clips: rPC's denominator."""
    path = files.path(workdir) / f"clean_source_seed{seed}.npz"
    stamp = stamps.make({"split": cfg.split, "batch_size": cfg.batch_size, "seed": seed,
                         "data": identity["data"], "runtime": identity["runtime"]},
                        {"edge": identity["edge"]}, STAMP_VERSION)
    # Every host must take the same branch (the forward passes are collective), and only
    # the main host writes: decide on its view of the disk, use the in-memory result.
    saved = _saved_stream(path, stamp, "clean accuracy", overwrite)
    if saved is None:
        source = tta.build(cfg, "source", edge, Context("source", mesh, seed,
                                                        cfg.batch_size, None, None))
        order = streams.clip_order(len(split), cfg.batch_size, seed)  # the streams' clips
        rows = parallel.host_slice(cfg.batch_size)
        predictions, labels = [], []
        batches = [order[start:start + cfg.batch_size][rows]
                   for start in range(0, len(order), cfg.batch_size)]
        for host in loader.index_batches(split, batches):
            logits = source.process(parallel.to_global(host["video"], mesh)).logits
            predictions.append(logits.argmax(-1))
            labels.append(parallel.gather_host_rows(host["label"]))
        saved = {"prediction": np.concatenate(predictions), "label": np.concatenate(labels)}
        files.save_npz(path, **saved, stamp=np.asarray(json.dumps(stamp)))
    return float(np.mean(saved["prediction"] == saved["label"]))


def run_stream(method: Method, stream: streams.Stream, reader: streams.StreamReader,
               cfg: ml_collections.ConfigDict, record: StreamRecord | None = None,
               checkpoint=None) -> dict[str, np.ndarray]:
    """One stream through one method from `record`'s position on (a fresh record: the
    start); `checkpoint(record)` every `cfg.checkpoint_every` batches."""
    record = record or StreamRecord.empty()
    num_batches = len(stream) // cfg.batch_size
    clock, done_before, started_at = time.perf_counter(), record.seconds, record.position
    for b, (clips, info) in enumerate(reader.batches(stream, record.position), record.position):
        result = method.process(clips)
        _record_batch(record, result, info)
        if record.before is None:
            record.before = top_class_fraction(result.logits)
        problem = health_problem(result, record.adapted, cfg.collapse_fraction, record.before)
        if problem:
            reporting.log(f"[adapt] {method.name} {stream.name} batch {b}: {problem}; "
                          "resetting to the source model")
            method.reset()
            record.adapted, record.before = False, None
        else:
            record.adapted = (record.adapted or result.updated) and not result.self_resets
        record.batches["stability_reset"].append(problem or "")
        record.position, record.seconds = b + 1, done_before + time.perf_counter() - clock
        if checkpoint and cfg.checkpoint_every and (b + 1) % cfg.checkpoint_every == 0 \
                and b + 1 < num_batches:
            checkpoint(record)
        if cfg.log_every and (b + 1) % cfg.log_every == 0 and b + 1 < num_batches:
            rate = (b + 1 - started_at) * cfg.batch_size / (time.perf_counter() - clock)
            reporting.log(f"[adapt] {method.name} {stream.name}: batch {b + 1}/{num_batches}  "
                          f"{rate:.0f} clips/s  ETA {(num_batches - b - 1) * cfg.batch_size / rate:.0f}s")
    return record.outcome(stream)


def _record_batch(record: StreamRecord, result: BatchResult, info: dict[str, np.ndarray]) -> None:
    rows, batches = record.rows, record.batches
    for key in ("id", "label", "corruption", "severity"):
        rows[key].append(info[key])
    rows["prediction"].append(result.logits.argmax(-1))
    rows["uploaded"].append(result.uploaded)
    rows["learned_from"].append(result.learned_from)
    for name, mask in (result.filter_failed or {}).items():  # CEMA's upload filters
        rows.setdefault(f"failed_{name}", []).append(mask)
    for key in ("loss", "bytes_up", "bytes_down", "cloud_steps", "self_resets"):
        batches[key].append(getattr(result, key))
    for name, value in (result.metrics or {}).items():
        batches.setdefault(f"metric_{name}", []).append(value)


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


Results = dict[str, dict[int, dict[str, dict[str, np.ndarray]]]]  # method, seed, stream


def summarize(results: Results, clean: dict[int, float], cfg: ml_collections.ConfigDict,
              pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Per method: its figures per seed (per corruption x severity and averaged: mPC,
    rPC, upload, ...), their mean and standard deviation over the seeds, accuracy by
    batch index; and the requested differences between methods with paired bootstrap
    intervals over every clip of every seed."""
    seeds = sorted(clean)
    methods = {}
    for name, per_seed in results.items():
        runs = [_run_stats(per_seed[seed], clean[seed]) for seed in seeds]
        methods[name] = {**_over_seeds(runs), "batch_accuracy": _batch_curve(per_seed)}
    differences = {}
    for a, b in pairs:
        (correct_a, labels_a), (correct_b, labels_b) = _correct(results[a]), _correct(results[b])
        if not np.array_equal(labels_a, labels_b):
            raise AssertionError(f"methods {a} and {b} did not see the same clips")
        differences[f"{a}-{b}"] = intervals.paired_accuracy_difference(
            correct_a, correct_b, cfg.bootstrap_resamples, seeds[0])
    return {"mpc": {name: m["accuracy"] for name, m in methods.items()},
            "upload": {name: m["upload_fraction"] for name, m in methods.items()},
            "protocol": cfg.protocol, "severities": list(cfg.severities),
            "corruptions": list(cfg.corruptions), "batch_size": cfg.batch_size,
            "seeds": seeds, "clean_accuracy": float(np.mean(list(clean.values()))),
            "methods": methods, "differences": differences,
            "settings": {**{name: tta.method_settings(cfg, name)[1] for name in results},
                         "collapse_fraction": cfg.collapse_fraction}}


def _run_stats(per_stream: dict[str, dict[str, np.ndarray]], clean_accuracy: float
               ) -> dict[str, Any]:
    """One method under one seed: per condition and averaged over the conditions."""
    rows = _rows_by_condition(per_stream)
    conditions = {cond: _condition_stats(r) for cond, r in rows.items()}
    mean = lambda key: float(np.mean([c[key] for c in conditions.values()]))
    total = lambda key: float(sum(c[key] for c in conditions.values()))
    stats = {
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
        "clips": int(sum(len(s["id"]) for s in per_stream.values())),
        "corruptions": conditions,
    }
    if all("metric_replay_only_steps" in s for s in per_stream.values()):  # CEMA's cloud
        stats["replay_only_steps"] = float(sum(s["metric_replay_only_steps"].sum()
                                               for s in per_stream.values()))
    if all("rejected" in c for c in conditions.values()):
        stats["rejected"] = {k: float(np.mean([c["rejected"][k] for c in conditions.values()]))
                             for k in next(iter(conditions.values()))["rejected"]}
    return stats


# Figures averaged over seeds (and given with their standard deviation where marked).
_MEANS = ("accuracy", "rpc", "upload_fraction", "learned_from_fraction", "bytes_up",
          "bytes_down", "cloud_steps", "replay_only_steps", "num_clips")
_WITH_STD = ("accuracy", "upload_fraction")


def _over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed figures -> their mean (and std), totals of resets and time."""
    out = _mean_over(runs)
    out["accuracy_per_seed"] = [r["accuracy"] for r in runs]
    for key in ("stability_resets", "self_resets", "seconds", "clips"):
        out[key] = sum(r[key] for r in runs)
    out["stream_clips_per_sec"] = float(out.pop("clips") / out["seconds"])
    out["corruptions"] = {cond: _mean_over([r["corruptions"][cond] for r in runs])
                          for cond in runs[0]["corruptions"]}
    return out


def _mean_over(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _MEANS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if len(values) == len(runs):
            out[key], std = intervals.mean_and_std(values)
            if key in _WITH_STD:
                out[f"{key}_std"] = std
    if all("rejected" in r for r in runs):
        out["rejected"] = {k: float(np.mean([r["rejected"][k] for r in runs]))
                           for k in runs[0]["rejected"]}
    return out


def _correct(per_seed: dict[int, dict[str, dict[str, np.ndarray]]]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per-clip correctness and labels over every seed and stream, in a fixed order."""
    parts = [per_seed[seed][stream] for seed in sorted(per_seed) for stream in sorted(per_seed[seed])]
    return (np.concatenate([p["prediction"] == p["label"] for p in parts]),
            np.concatenate([p["label"] for p in parts]))


def _batch_curve(per_seed: dict[int, dict[str, dict[str, np.ndarray]]]) -> list[float]:
    """Accuracy by batch index within a stream, averaged over the streams and seeds."""
    curves = []
    for streams_of_seed in per_seed.values():
        for s in streams_of_seed.values():
            batches = len(s["loss"])
            curves.append((s["prediction"] == s["label"]).reshape(batches, -1).mean(1))
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0).tolist()


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
    """One row per method: mPC ± std over seeds, rPC, upload, bytes, cloud and replay-only
    steps, resets, speed; then the differences between methods."""
    seeds = summary["seeds"]
    lines = [
        f"Protocol `{summary['protocol']}`, severities {summary['severities']}, corruptions "
        f"{len(summary['corruptions'])}, stream batch {summary['batch_size']}, "
        f"{len(seeds)} seed{'s' * (len(seeds) > 1)} {seeds} (mean ± standard deviation over "
        "them; a seed sets the stream's order and the corruptions' noise). Accuracy is of "
        "the predictions each method made before adapting on the batch. mPC: mean accuracy "
        "over the corruptions; rPC: mPC / the source model's clean accuracy "
        f"({summary['clean_accuracy']:.3f}). Upload: fraction of the stream's clips sent to "
        "the cloud (CEMA); learned from: fraction the adaptation used. Bytes, steps: per "
        "seed; resets: all seeds.", "",
        "| method | mPC | rPC | upload | learned from | MB up | KB down | cloud steps | "
        "replay-only steps | stability resets | self resets | clips/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        replay = f"{m['replay_only_steps']:.0f}" if "replay_only_steps" in m else "–"
        lines.append(
            f"| {name} | {m['accuracy']:.4f} ± {m['accuracy_std']:.4f} | {m['rpc']:.3f} | "
            f"{m['upload_fraction']:.1%} | {m['learned_from_fraction']:.1%} | "
            f"{m['bytes_up'] / 1e6:.2f} | {m['bytes_down'] / 1e3:.1f} | {m['cloud_steps']:.0f} | "
            f"{replay} | {m['stability_resets']} | {m['self_resets']} | "
            f"{m['stream_clips_per_sec']:.0f} |")
    for name, m in summary["methods"].items():
        if m.get("rejected"):
            turned_down = ", ".join(f"{k} {v:.1%}" for k, v in m["rejected"].items())
            lines += ["", f"{name}'s upload filters turned down (each on its own, a clip can "
                      f"fail several): {turned_down} of the stream."]
    if summary["differences"]:
        lines += ["", "Differences in accuracy over every clip of every seed (95% paired "
                  "bootstrap interval over the clips; an interval excluding 0 is a difference "
                  "beyond the clips' sampling noise):", "",
                  "| difference | accuracy points | 95% interval | clips |", "|---|---|---|---|"]
        for pair, d in summary["differences"].items():
            interval = (f"{100 * d['ci95_low']:+.2f} .. {100 * d['ci95_high']:+.2f}"
                        if "ci95_low" in d else "–")
            lines.append(f"| {pair} | {100 * d['difference']:+.2f} | {interval} | {d['clips']} |")
    if summary.get("differences_not_computed"):
        lines += ["", "Not computed (a method not run): "
                  + ", ".join(summary["differences_not_computed"]) + "."]
    return lines


def markdown(summary: dict[str, Any]) -> str:
    """report.md: the headline table, accuracy per corruption, the settings, figures."""
    methods = summary["methods"]
    conditions = sorted(next(iter(methods.values()))["corruptions"])
    lines = ["# Online adaptation under corruptions", "",
             reporting.devices_sentence(summary.get("devices")), "", *headline_table(summary)]
    lines += ["", "## Accuracy per corruption (mean over seeds)", "",
              "| corruption | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for cond in conditions:
        cells = [f"{methods[m]['corruptions'][cond]['accuracy']:.3f}" for m in methods]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    lines += ["", "## Settings", "", "```", _settings(summary["settings"]), "```", "",
              "![accuracy vs upload](accuracy_vs_upload.png)", "",
              "![accuracy vs batch](accuracy_vs_batch.png)", ""]
    return "\n".join(lines)


def _settings(settings: dict[str, Any]) -> str:
    return "\n".join(f"{group}: {values}" for group, values in settings.items())


def _plot_upload(path: str, summary: dict[str, Any]) -> None:
    """mPC against the fraction of the stream uploaded, one point per method (± std)."""
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, m in summary["methods"].items():
        marker = "*" if name.startswith("cema") else "o"
        ax.errorbar([m["upload_fraction"]], [m["accuracy"]], yerr=[m["accuracy_std"]],
                    fmt=marker, ms=12 if marker == "*" else 8, capsize=3, label=name)
        ax.annotate(name, (m["upload_fraction"], m["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("upload fraction of the stream")
    ax.set_ylabel("mPC (accuracy under corruption)")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    files.save_figure(fig, path)


def _plot_batches(path: str, summary: dict[str, Any]) -> None:
    """By batch index within the stream (mean over streams and seeds): the online
    (cumulative) accuracy, and each method's accuracy minus the reference's (`norm`, else
    the first method) smoothed over a few batches: whether a method keeps gaining on
    plain test-batch normalisation, stalls or collapses."""
    plt = reporting.pyplot()
    methods = summary["methods"]
    reference = "norm" if "norm" in methods else next(iter(methods))
    base = np.asarray(methods[reference]["batch_accuracy"])
    fig, (online, gain) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, m in methods.items():
        curve = np.asarray(m["batch_accuracy"])
        batches = np.arange(1, len(curve) + 1)
        online.plot(batches, np.cumsum(curve) / batches, label=name, lw=1.2)
        window = max(1, len(curve) // 16)
        smooth = np.convolve(curve - base, np.ones(window) / window, mode="valid")
        gain.plot(np.arange(len(smooth)) + (window + 1) / 2, 100 * smooth, label=name, lw=1.2)
    online.set_ylabel("online accuracy (clips so far)")
    gain.set_ylabel(f"accuracy − {reference}'s (points, {max(1, len(base) // 16)}-batch mean)")
    gain.set_yscale("symlog", linthresh=1.0)  # linear within ±1 point: small gains show
    for ax in (online, gain):
        ax.set_xlabel(f"batch of the stream ({summary['batch_size']} clips)")
        ax.grid(alpha=0.3)
    gain.legend(fontsize=7, loc="best")
    fig.tight_layout()
    files.save_figure(fig, path)
