"""The `link` job: an edge streaming a (corrupted) split through the hybrid system, its
cloud a `serve` job across a real gRPC link; latency measured per clip.

    python -m dmd_jax.main --config configs/demo.py:serve --workdir runs/demo/serve &
    python -m dmd_jax.main --config configs/demo.py:link --workdir runs/demo/link

For each offload rate in `link.offload_rates` the router's threshold is set to that
quantile of its scores on the stream (an edge-only first pass), and every batch goes
through `HybridClassifier` with `RemoteCloud` as its cloud: the edge and router on the
device, the routed clips encoded (`link.crf`; 0: raw uint8), sent, queued, decoded and
classified by the server, answered. A clip the cloud does not answer within
`link.deadline_s` is answered by the edge (`fallback`). Per clip (a clip waits for its
batch): edge + router, encode, transfer (the call's wall time less the server's own),
queue, decode and forward, with p50/p99 over the stream; and the latency model

    latency = edge + router + r * (bytes / bandwidth + RTT + cloud)

fitted on loopback (a request of n clips: fixed + n x per-clip ms, least squares over
every request; RTT: an empty `Health` call), checked against each rate's measured mean,
and drawn as accuracy against latency for `link.bandwidths_mbit` x `link.rtts_ms`
(`latency.png`). A clip the edge keeps is answered after the edge and router; an
offloaded one after its batch's request. The server must serve the same cloud model as
`config.cloud.path` (its fingerprint is checked).

Then, at the operating point's threshold, each of `link.methods` streams the same
batches over the link: `dmd` (the hybrid as deployed), `cema` (the CEMA edge, uploading
what its filters keep through `Adapt`) and `dmd_cema` (one upload, two uses: the clips the
router sends are answered by the cloud and, those that pass CEMA's filters, `config.cema`,
join the server's adaptation buffer; the new normalisation parameters come back with the
answers). Accuracy, offload rate, the fraction adapted on, bytes up and parameter
downloads per method go into the summary. The server's `config.cema` is the cloud's side.
With `link.deployed_edge` (an `export_edge` artifact of this edge and operating point,
`export.normalization='batch'`), the CEMA edges run that artifact in ONNX Runtime instead
of JAX, and the cloud's parameters are applied to it between batches.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dmd_jax import files, hybrid, jobs, parallel, reporting
from dmd_jax.data import pipeline, streams
from dmd_jax.deploy import runtime
from dmd_jax.errors import UserError, check_positive
from dmd_jax.serve import client
from dmd_jax.tta import cema
from dmd_jax.tta.adaptable import Adaptable

SECTIONS = ("data", "edge", "cloud", "link", "cema", "runtime")
KEYS = {"edge": ("path", "switcher_dir", "operating_point"), "cloud": ("path",),
        "link": ("address", "server_file", "deadline_s", "adapt_deadline_s", "crf", "backoff_s",
                 "split", "corruption", "severity", "batch_size", "max_batches",
                 "offload_rates", "methods", "cloud_answers", "deployed_edge", "bandwidths_mbit",
                 "rtts_ms"),
        "cema": cema.LINK_EDGE_SETTINGS}
METHODS = ("dmd", "cema", "dmd_cema")
COMPONENTS = ("edge_ms", "encode_ms", "transfer_ms", "queue_ms", "decode_ms", "forward_ms")


class LinkError(UserError, RuntimeError):
    """The cloud server cannot be reached or serves another model."""


@jobs.entry("link", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.link
    check_positive(cfg, ("batch_size", "max_batches"), "config.link")
    for key in ("deadline_s", "adapt_deadline_s"):
        if not cfg[key] > 0:
            raise UserError(f"config.link.{key}={cfg[key]} must be > 0 (seconds)")
    remote = client.RemoteCloud(_address(cfg), cfg.deadline_s, int(cfg.crf),
                                backoff_s=tuple(cfg.backoff_s))
    system = hybrid.HybridClassifier.from_dirs(
        config.edge.path, config.edge.switcher_dir, config.edge.operating_point,
        config.cloud.path, cloud=remote, runtime=config.runtime)
    _check_server(remote, config.cloud.path)
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise UserError(f"config.link.methods names {unknown}: the link runs {METHODS}")
    if cfg.cloud_answers not in ("model", "adapted"):
        raise UserError(f"config.link.cloud_answers={cfg.cloud_answers!r}: expected 'model' "
                        "(the cloud as trained) or 'adapted' (the edge's CEMA foundation)")
    if cfg.deployed_edge:
        _check_deployed_edge(cfg.deployed_edge, system)
    rtt_ms = _round_trip_ms(remote)
    batches = _stream(config, cfg)
    operating_threshold = system.threshold
    scores = np.concatenate([np.asarray(system.edge_and_router(b["video"])[1]) for b in batches])
    rows = []
    for rate in cfg.offload_rates:
        system.threshold = _threshold(scores, float(rate))
        rows.append(_measure(system, remote, batches, float(rate)))
        reporting.log(f"[link] offload {rate:.0%}: accuracy {rows[-1]['accuracy']:.4f}, p50 "
                      f"{rows[-1]['latency_p50_ms']:.1f} ms, p99 {rows[-1]['latency_p99_ms']:.1f} "
                      f"ms, fallbacks {rows[-1]['fallback']}")
    model = _latency_model(rows, rtt_ms)
    system.threshold = operating_threshold
    methods = {name: _adaptive_pass(name, system, remote.address, config, batches)
               for name in cfg.methods}
    summary = {"address": remote.address, "crf": int(cfg.crf), "rtt_ms": rtt_ms,
               "clips": int(sum(len(b["label"]) for b in batches)), "rates": rows,
               "methods": methods, "latency_model": model,
               "link": dataclasses.asdict(remote.stats)}
    files.write_json(files.path(workdir) / "summary.json", summary)
    _plot(str(files.path(workdir) / "latency.png"), rows, model, cfg)
    remote.close()
    return summary


def _check_deployed_edge(directory: str, system: hybrid.HybridClassifier) -> None:
    """The artifact must be this edge and router at this operating point, normalising
    with each batch's statistics as the CEMA edges do."""
    manifest = runtime.read_manifest(directory)
    made_from = manifest["stamp"].get("inputs", {})
    expected = {"edge": system.edge.fingerprint, "router": system.router.spec,
                "threshold": str(system.threshold)}
    wrong = [k for k, v in expected.items() if made_from.get(k) != v]
    if wrong or manifest["normalization"] != "batch":
        what = f"another {', '.join(wrong)}" if wrong else (
            f"{manifest['normalization']!r} normalisation, not 'batch'")
        raise LinkError(f"config.link.deployed_edge={directory!r} was exported with {what} "
                        "than this link's CEMA edges use: run export_edge on config.edge's "
                        "model and operating point with export.normalization='batch'")


def _address(cfg: ml_collections.ConfigDict) -> str:
    if cfg.address:
        return cfg.address
    path = files.path(cfg.server_file)
    if not path.exists():
        raise LinkError(f"no server file {cfg.server_file!r}: start the cloud first (the serve "
                        "job writes it when it accepts calls) or set config.link.address")
    return files.read_json(path)["address"]


def _check_server(remote: client.RemoteCloud, cloud_path: str) -> None:
    from dmd_jax import model_store
    expected = model_store.stored_fingerprint(cloud_path)
    try:
        health = remote.health(timeout_s=10)
    except Exception as err:  # noqa: BLE001 - grpc's errors
        raise LinkError(f"the cloud at {remote.address} does not answer ({err}); is the serve "
                        "job running?") from err
    if expected and health.model != expected:
        raise LinkError(f"the cloud at {remote.address} serves model {health.model}, not "
                        f"{cloud_path} ({expected}): start it with that model")


def _round_trip_ms(remote: client.RemoteCloud, calls: int = 20) -> float:
    """The link's round trip: the median of empty Health calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        remote.health()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _stream(config: ml_collections.ConfigDict, cfg) -> list[dict[str, np.ndarray]]:
    """The stream's batches on the host, corrupted as the adapt job corrupts them."""
    builder = pipeline.prepare(config.data)
    split = pipeline.open_split(builder, config.data, cfg.split)
    if not cfg.corruption:
        order = streams.clip_order(len(split), cfg.batch_size, config.seed)
        starts = range(0, min(len(order), cfg.batch_size * cfg.max_batches), cfg.batch_size)
        return [split.rows(order[s:s + cfg.batch_size]) for s in starts]
    (stream,) = streams.make_streams(streams.Protocol.parse("reset"), np.zeros(len(split), int),
                                     (cfg.corruption,), (int(cfg.severity),), cfg.batch_size,
                                     config.seed)
    reader = streams.StreamReader(split, cfg.batch_size, parallel.make_mesh(), config.seed)
    out = []
    for clips, info in reader.batches(stream):
        out.append({"video": np.asarray(parallel.fetch(clips)), "label": info["label"]})
        if len(out) == cfg.max_batches:
            break
    return out


def _threshold(scores: np.ndarray, rate: float) -> float:
    if rate <= 0:
        return -np.inf
    if rate >= 1:
        return np.inf
    return float(np.quantile(scores, rate))


def _measure(system: hybrid.HybridClassifier, remote: client.RemoteCloud,
             batches: list[dict[str, np.ndarray]], rate: float) -> dict[str, Any]:
    """One pass. A clip the edge keeps is answered after the edge and router; an
    offloaded one after its batch's request to the cloud too. Per clip latencies and
    components; per request, its clips, time and bytes (what the latency model fits)."""
    per_clip: dict[str, list[float]] = {k: [] for k in ("latency_ms", *COMPONENTS)}
    requests = []
    correct = offloaded = fallback = routed_bytes = total = 0
    for batch in batches:
        n = len(batch["label"])
        start = time.perf_counter()
        jax.block_until_ready(system.edge_and_router(batch["video"]))
        edge_ms = (time.perf_counter() - start) * 1e3
        remote.last_timing = {}
        start = time.perf_counter()
        result = system(batch["video"])  # the edge half again, then the link
        total_ms = (time.perf_counter() - start) * 1e3
        sent = result.offloaded | result.fallback  # clips that waited for the link
        timing = remote.last_timing if result.offloaded.any() else {}
        request_ms = max(total_ms - edge_ms, 0.0)
        for i in range(n):
            per_clip["latency_ms"].append(edge_ms + (request_ms if sent[i] else 0.0))
            per_clip["edge_ms"].append(edge_ms)
            for name in COMPONENTS[1:]:
                per_clip[name].append(timing.get(name, 0.0) if result.offloaded[i] else 0.0)
        if result.offloaded.any():
            requests.append((int(result.offloaded.sum()), request_ms, int(timing["bytes"])))
        correct += int((result.predictions == batch["label"]).sum())
        offloaded += int(result.offloaded.sum())
        fallback += int(result.fallback.sum())
        routed_bytes += int(timing.get("bytes", 0))
        total += n
    latency = np.asarray(per_clip["latency_ms"])
    return {"target_offload": rate, "offload_rate": offloaded / total, "fallback": fallback,
            "accuracy": correct / total, "bytes_up_per_clip": routed_bytes / total,
            "batch_size": len(batches[0]["label"]), "requests": requests,
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p99_ms": float(np.percentile(latency, 99)),
            "latency_mean_ms": float(latency.mean()),
            **{f"mean_{k}": float(np.mean(v)) for k, v in per_clip.items() if k != "latency_ms"}}


def _adaptive_pass(name: str, system: hybrid.HybridClassifier, address: str, config,
                   batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The stream at the operating point's threshold, over the link, as `name`:

    - `dmd`: the hybrid as deployed (source edge, router, the cloud for routed clips);
    - `cema`: the CEMA edge (batch statistics, the parameters the cloud sends), answering
      every clip itself and uploading what its filters keep (`Adapt`);
    - `dmd_cema`: the CEMA edge and the router on its features; routed clips go up once
      (`Classify`), answered by the cloud (`link.cloud_answers`: as trained, or this
      edge's adapted foundation model), and those CEMA's filters keep are marked to join
      its buffer: one upload, two uses.

    Each pass is its own edge on the server (a fresh CEMA cloud) and its own channel."""
    cfg = config.link
    remote = client.RemoteCloud(address, cfg.deadline_s, int(cfg.crf),
                                edge=f"link-{name}-{os.getpid()}-{time.time_ns()}",
                                backoff_s=tuple(cfg.backoff_s),
                                adapt_deadline_s=cfg.adapt_deadline_s)
    mesh = parallel.make_mesh()
    edge = deployed = None
    if name != "dmd":
        settings = {**config.cema.to_dict(), "upload_crf": 0, "batch_renorm": False}
        edge = cema.Edge(Adaptable.of(system.edge), mesh, ml_collections.ConfigDict(settings))
        if cfg.deployed_edge:  # a fresh copy: its parameters start from the source model's
            deployed = runtime.DeployedEdge(cfg.deployed_edge)
    counts = {"correct": 0, "offloaded": 0, "adapted_on": 0, "fallback": 0, "downloads": 0}
    hybrid_cloud, system.cloud = system.cloud, remote
    try:
        for batch in batches:
            if edge is None:
                result = system(batch["video"])
                predictions, routed = result.predictions, result.offloaded
                counts["fallback"] += int(result.fallback.sum())
            else:
                predictions, routed = _adapting_edge_batch(
                    name, system, edge, remote, mesh, batch["video"], counts,
                    adapted_answer=cfg.cloud_answers == "adapted", deployed=deployed)
            counts["correct"] += int((predictions == batch["label"]).sum())
            counts["offloaded"] += int(routed.sum())
    finally:
        system.cloud = hybrid_cloud
        remote.close()
    total = sum(len(b["label"]) for b in batches)
    row = {"edge_runtime": "deployed (ONNX Runtime)" if deployed else "JAX",
           "accuracy": counts["correct"] / total, "offload_rate": counts["offloaded"] / total,
           "adapted_on": counts["adapted_on"] / total, "fallback": counts["fallback"],
           "parameters_received": counts["downloads"],
           "bytes_up_per_clip": remote.stats.bytes_up / total,
           "link": dataclasses.asdict(remote.stats)}
    reporting.log(f"[link] {name} at the operating point: accuracy {row['accuracy']:.4f}, "
                  f"offloaded {row['offload_rate']:.1%}, adapted on {row['adapted_on']:.1%}, "
                  f"{row['bytes_up_per_clip'] / 1e3:.1f} kB up per clip, "
                  f"{counts['downloads']} parameter downloads, fallbacks {counts['fallback']}")
    return row


def _adapting_edge_batch(name, system, edge: cema.Edge, remote: client.RemoteCloud, mesh,
                         video: np.ndarray, counts: dict[str, int], adapted_answer: bool,
                         deployed: runtime.DeployedEdge | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One batch at a CEMA edge (`cema`, `dmd_cema`): predictions and the routed clips
    the cloud answered. A cloud that does not answer leaves the edge's predictions and
    its parameters as they were (the uploads of `cema` wait in the client's queue).
    With `deployed`, the edge's forward and router run there (ONNX Runtime) and the
    cloud's parameters are applied to it; `edge` then only filters the uploads."""
    if deployed is not None:
        answer = deployed.predict(video)
        logits, offload = answer.logits, answer.offload
    else:
        logits, features = edge.predict_outputs(parallel.to_global(video, mesh))
        offload = (system.router.scores(parallel.fetch(features), logits) < system.threshold
                   if name == "dmd_cema" else None)
    predictions = logits.argmax(-1)
    routed = offload if name == "dmd_cema" else np.zeros(len(video), bool)
    keep, _ = edge.choose(logits, candidates=routed if name == "dmd_cema" else None)
    parameters = None
    try:
        if name == "cema":
            parameters = remote.adapt(video[keep])
        elif routed.any():
            cloud_logits, parameters = remote.classify(
                video[routed], keep[routed], adapted_answer=adapted_answer)
            predictions[routed] = hybrid.fuse(logits[routed], cloud_logits, system.fusion_weight)
        else:  # nothing to send: only ask for parameters a step has made since
            parameters = remote.adapt(video[:0])
    except client.CloudUnavailable:  # (dmd_cema's Classify) the clips reached neither use
        counts["fallback"] += int(routed.sum())
        routed, keep = np.zeros_like(routed), np.zeros_like(keep)
    if parameters is not None:
        download = cema.Download(client.norm_affine_from(parameters,
                                                         edge.model.source_norm_affine))
        if deployed is not None:
            deployed.apply(download.norm_affine)  # lands between batches
        else:
            edge.receive(download)
        counts["downloads"] += 1
    counts["adapted_on"] += int(keep.sum())
    return predictions, routed


def _latency_model(rows: list[dict[str, Any]], rtt_ms: float) -> dict[str, Any]:
    """`latency = edge + router + r * (bytes/bandwidth + RTT + cloud)`, fitted: a
    request of n clips takes `fixed + n * per_clip` ms on loopback (least squares over
    every request of every rate; `fixed` holds the loopback RTT), its bytes are
    `n * bytes_per_clip`. Each rate's mean latency predicted from the fit, against the
    measured mean."""
    requests = np.asarray([r for row in rows for r in row["requests"]], np.float64)
    edge_ms = float(np.mean([row["mean_edge_ms"] for row in rows]))
    if len(requests) >= 2 and len(np.unique(requests[:, 0])) >= 2:
        per_clip_ms, fixed_ms = np.polyfit(requests[:, 0], requests[:, 1], 1)
    else:
        per_clip_ms, fixed_ms = (0.0, float(requests[:, 1].mean()) if len(requests) else 0.0)
    bytes_per_clip = float(requests[:, 2].sum() / requests[:, 0].sum()) if len(requests) else 0.0
    model = {"edge_ms": edge_ms, "fixed_ms_per_request": float(fixed_ms),
             "cloud_ms_per_clip": float(per_clip_ms), "rtt_ms": rtt_ms,
             "bytes_per_offloaded_clip": bytes_per_clip}
    model["loopback_check"] = [
        {"target_offload": row["target_offload"], "measured_mean_ms": row["latency_mean_ms"],
         "predicted_mean_ms": (predicted := predicted_latency_ms(
             model, row["offload_rate"], row["batch_size"], np.inf, rtt_ms)),
         "ratio": row["latency_mean_ms"] / predicted if predicted else None} for row in rows]
    return model


def predicted_latency_ms(model: dict[str, Any], rate: float, batch_size: int,
                         bandwidth_mbit: float, rtt_ms: float) -> float:
    """Mean latency per clip at offload rate `rate` over a link of this bandwidth and RTT:
    the offloaded fraction waits for a request of `rate * batch_size` clips."""
    clips = rate * batch_size
    transfer_ms = clips * model["bytes_per_offloaded_clip"] * 8 / (bandwidth_mbit * 1e6) * 1e3
    request_ms = (model["fixed_ms_per_request"] - model["rtt_ms"] + rtt_ms
                  + clips * model["cloud_ms_per_clip"] + transfer_ms)
    return model["edge_ms"] + rate * request_ms if clips else model["edge_ms"]


def _plot(path, rows, model, cfg) -> None:
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [r["offload_rate"] for r in rows]
    accuracy = [r["accuracy"] for r in rows]
    ax.plot([r["latency_mean_ms"] for r in rows], accuracy, "ko-", label="loopback, measured")
    for bandwidth in cfg.bandwidths_mbit:
        for rtt in cfg.rtts_ms:
            ax.plot([predicted_latency_ms(model, r, rows[0]["batch_size"], bandwidth, rtt)
                     for r in rates], accuracy,
                    "--", marker=".", label=f"{bandwidth:g} Mbit/s, {rtt:g} ms (model)")
    ax.set_xlabel("mean latency per clip (ms)")
    ax.set_ylabel("accuracy")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Hybrid accuracy vs latency over offload rates")
    fig.tight_layout()
    files.save_figure(fig, path)
