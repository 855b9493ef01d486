"""The `label` job: Dual-Model Distillation labels from edge/cloud agreement.

Edge and cloud run over whole splits (the unlabelled pool the switcher learns from, and
the calibration and test splits the hybrid system is evaluated on), sharded over every
device and host, and each clip's edge features and logits, cloud logits and switcher
targets are written in the label format of `dmd_jax.data.labels`. The models' weights
are arguments of the compiled step, not constants baked into it.

A split named `SPLIT@CORRUPTION@SEVERITY` (`'test@fog@3'`) is SPLIT with every clip
corrupted on the device as the adapt job corrupts it (the corruption's noise keyed by
`SHIFT_SEED` and the clip's id): the clips a deployed router meets under distribution shift
(`config.hybrid.shift_splits`).

Chunks are written atomically, each holding a fixed range of clips: a killed run started
again skips the chunks on disk and recomputes only the missing or damaged ones, so no clip
is lost or written twice. The workdir's stamp records the models (fingerprints), the data
and the settings; labels made with others are never reused.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmd_jax import files, jobs, model_store, parallel, reporting, stamps, uploads
from dmd_jax.data import corruptions, host_corruptions, labels, loader, pipeline
from dmd_jax.errors import UserError, check_positive

SHIFT_SEED = 0  # the corruptions' noise in shifted splits (the adapt job's first seed)
# This job's computation version (`stamps.make`): bump it when its results would change
# for the same settings and inputs, so that results made by older code are not reused.
STAMP_VERSION = 1
SECTIONS = ("data", "edge", "cloud", "label", "runtime")
KEYS = {"label": ("splits", "switcher_split", "batch_size", "chunk_size", "upload_crfs"),
        "edge": ("path",), "cloud": ("path",)}


@jobs.entry("label", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = config.label
    check_positive(cfg, ("batch_size", "chunk_size"), "config.label")
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)
    if cfg.chunk_size % cfg.batch_size:
        raise UserError(f"config.label.chunk_size={cfg.chunk_size} must be a multiple of "
                        f"config.label.batch_size={cfg.batch_size}")

    crfs = tuple(int(c) for c in cfg.upload_crfs)
    for crf in crfs:
        uploads.check_crf(crf, "config.label.upload_crfs")
    model_store.require(config.edge.path, "edge")  # before preparing the data: fail fast
    model_store.require(config.cloud.path, "cloud")
    builder = pipeline.prepare(config.data)
    names = tuple(builder.info.features["label"].names)
    edge = model_store.load(config.edge.path, "edge", config.runtime, class_names=names)
    cloud = model_store.load(config.cloud.path, "cloud", config.runtime, class_names=names)
    stamp = stamps.make(
        {"data": pipeline.dataset_identity(builder, config.data),
         "chunk_size": cfg.chunk_size, "runtime": config.runtime,
         **({"upload_crfs": list(crfs)} if crfs else {})},
        {"edge": edge.fingerprint, "cloud": cloud.fingerprint}, STAMP_VERSION)
    stamps.claim(workdir, stamp, "labels", config.get("overwrite", False),
                 has_results=any(labels.chunk_paths(workdir, s) for s in cfg.splits),
                 clear=lambda: [files.remove_tree(files.path(workdir) / s) for s in cfg.splits])
    files.write_json(files.path(workdir) / "config.json", config.to_dict())

    replicated, batch = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    infer = jax.jit(lambda ev, cv, video: edge_and_cloud(edge, cloud, ev, cv, video),
                    in_shardings=(replicated, replicated, batch), out_shardings=batch)
    weights = parallel.put_replicated((edge.variables, cloud.variables), mesh)
    step = lambda video: infer(*weights, video)
    cloud_only = jax.jit(lambda cv, video: cloud.apply(cv, video)[0].astype(jnp.float32),
                         in_shardings=(replicated, batch), out_shardings=batch)
    uploaded = functools.partial(_cloud_on_uploads, lambda video: cloud_only(weights[1], video),
                                 crfs=crfs, mesh=mesh, batch_size=cfg.batch_size)

    summary: dict[str, Any] = {"splits": {}, "devices": parallel.describe()}
    shifted = {name: corruptions.parse_shifted(name) for name in cfg.splits}  # checked first
    for split_name, (base, corruption, severity) in shifted.items():
        split = pipeline.open_split(builder, config.data, base)
        split.name = split_name  # its folder in the label dir
        prepare = functools.partial(_on_mesh, mesh=mesh, corruption=corruption,
                                    severity=severity)
        summary["splits"][split_name] = _label_split(step, prepare, split, cfg, mesh, workdir,
                                                      int(config.data.get("workers", 0)),
                                                      uploaded)
    main = summary["splits"].get(cfg.switcher_split) or next(iter(summary["splits"].values()))
    summary.update(num_labelled=main["num_clips"], agreement_rate=main["agreement_rate"])
    files.write_json(files.path(workdir) / "summary.json", summary)
    return summary


def edge_and_cloud(edge: model_store.LoadedModel, cloud: model_store.LoadedModel,
                   edge_variables: Any, cloud_variables: Any,
                   video: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The label step: both models on one batch of uint8 clips."""
    edge_logits, edge_features = edge.apply(edge_variables, video)
    cloud_logits, _ = cloud.apply(cloud_variables, video)
    return {"edge_logits": edge_logits.astype(jnp.float32),
            "edge_features": edge_features.astype(jnp.float32),
            "cloud_logits": cloud_logits.astype(jnp.float32)}


def _on_mesh(batch: dict[str, np.ndarray], mesh, corruption: str | None,
             severity: int | None) -> jax.Array:
    """A host batch's clips on the mesh, corrupted for a shifted split (a codec
    corruption or rain on the host, every other on the device)."""
    if corruption is not None and corruptions.on_host(corruption):
        video = batch["video"]
        views = video.shape[1] if video.ndim == 6 else 1
        flat = video.reshape(-1, *video.shape[-4:])
        flat = host_corruptions.corrupt_rows(flat, np.repeat(batch["id"], views),
                                             [corruption] * len(flat), [severity] * len(flat),
                                             SHIFT_SEED)
        return parallel.to_global(flat.reshape(video.shape), mesh)
    video = parallel.to_global(batch["video"], mesh)
    if corruption is None:
        return video
    ids = parallel.to_global(batch["id"], mesh)
    return _corrupt(video, ids, corruption, severity)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _corrupt(video: jax.Array, ids: jax.Array, corruption: str, severity: int) -> jax.Array:
    """Every view of a clip under the clip's own corruption noise."""
    if video.ndim == 6:  # (B, V, T, H, W, 3): several evaluation views
        clips, views = video.shape[:2]
        flat = corruptions.corrupt_clips(video.reshape(clips * views, *video.shape[2:]),
                                         jnp.repeat(ids, views), corruption, severity,
                                         SHIFT_SEED)
        return flat.reshape(video.shape)
    return corruptions.corrupt_clips(video, ids, corruption, severity, SHIFT_SEED)


def _cloud_on_uploads(cloud_fn, video: jax.Array, crfs: tuple[int, ...], mesh,
                      batch_size: int) -> dict[str, np.ndarray]:
    """Per CRF, the cloud's logits on the clips as decoded from H.264 at that CRF and the
    encoded bytes per clip (`cloud_logits_crf<c>`, `upload_bytes_crf<c>`): what a
    deployed edge's offloads cost and what the cloud makes of them."""
    if not crfs:
        return {}
    clips = parallel.fetch(video)  # every row, on every host (each encodes all: the same)
    rows = parallel.host_slice(batch_size)
    out = {}
    for crf in crfs:
        decoded, sizes = uploads.encode_decode(clips, crf)
        out[f"cloud_logits_crf{crf}"] = parallel.fetch(
            cloud_fn(parallel.to_global(decoded[rows], mesh)))
        out[f"upload_bytes_crf{crf}"] = sizes
    return out


def _label_split(infer, prepare, split: pipeline.Split, cfg: ml_collections.ConfigDict, mesh,
                 workdir: str, workers: int = 0, uploaded=None) -> dict[str, Any]:
    """Labels every chunk of `split` not yet on disk; returns the split's statistics."""
    chunks = range(0, len(split), cfg.chunk_size)
    done = np.array([labels.chunk_done(workdir, split.name, start,
                                       min(start + cfg.chunk_size, len(split)))
                     for start in chunks])
    done = parallel.broadcast_from_main(done)  # every host must run the same batches
    todo = [start for start, d in zip(chunks, done) if not d]
    if len(todo) < len(chunks):
        reporting.log(f"[label] {split.name}: {len(chunks) - len(todo)} of {len(chunks)} "
                      "chunks already on disk; labelling the rest")
    rows = parallel.host_slice(cfg.batch_size)
    done_clips, t0 = 0, time.perf_counter()
    for start in todo:
        stop = min(start + cfg.chunk_size, len(split))
        parts = []
        for batch in loader.eval_batches(split, cfg.batch_size, rows, start, stop, workers):
            video = prepare(batch)
            outputs = parallel.fetch(infer(video))
            if uploaded is not None:
                outputs.update(uploaded(video))
            host = parallel.gather_host_rows({k: batch[k] for k in ("label", "id", "mask")})
            keep = host["mask"].astype(bool)
            parts.append({**{k: v[keep] for k, v in outputs.items()},
                          "label": host["label"][keep], "id": host["id"][keep]})
        chunk = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        files.save_npz(labels.chunk_path(workdir, split.name, start), **chunk,
                       **labels.targets(chunk))
        done_clips += stop - start
        rate = done_clips / (time.perf_counter() - t0)
        reporting.log(f"[label] {split.name}: clips {stop}/{len(split)}  {rate:.0f} clips/s  "
                      f"ETA {_eta(len(split) - stop, rate)}")
    parallel.barrier("chunks written")  # the main host wrote them; every host reads them
    labelled = labels.read_split(workdir, split.name)
    stats = {
        "num_clips": int(len(labelled["id"])),
        "agreement_rate": float(labelled["hard"].mean()),
        "edge_accuracy": _accuracy(labelled["edge_logits"], labelled["label"]),
        "cloud_accuracy": _accuracy(labelled["cloud_logits"], labelled["label"]),
        "clips_per_sec": float(done_clips / (time.perf_counter() - t0)) if done_clips else None,
    }
    reporting.log(f"[label] {split.name}: {stats['num_clips']} clips, agreement "
                  f"{stats['agreement_rate']:.3f}, edge accuracy {stats['edge_accuracy']:.3f}, "
                  f"cloud accuracy {stats['cloud_accuracy']:.3f}")
    return stats


def _accuracy(logits: np.ndarray, truth: np.ndarray) -> float | None:
    labelled = truth >= 0
    if not labelled.any():
        return None
    return float(np.mean(logits[labelled].argmax(-1) == truth[labelled]))


def _eta(remaining: int, rate: float) -> str:
    return f"{remaining / rate:.0f}s" if rate > 0 else "?"
