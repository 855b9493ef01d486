"""The `label` job: Dual-Model Distillation labels from edge/cloud agreement.

Edge and cloud run over whole splits (the unlabelled pool the switcher learns from, and
the calibration and test splits the hybrid system is evaluated on), sharded over every
device and host. Per clip it stores the id, the edge's pooled features and logits, the
cloud's logits and the switcher targets of METHODS.md §1:

- `hard`: 1 if edge and cloud predict the same class (no human label used);
- `soft`: the cloud's probability of the edge's class (no human label used);
- `ground_truth`: 1 if the edge is right (ablation only; -1 where a clip has no label).

Output: `WORKDIR/<split>/chunk_NNNNN.npz`, each holding a fixed range of clips and
written atomically. A killed run started again skips the chunks on disk and recomputes
only the missing ones, so no clip is lost or written twice. `read_split` gives a split
back as one dict of arrays.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmd_jax import model_store, parallel, reporting
from dmd_jax.data import pipeline
from dmd_jax.errors import UserError


class LabelsNotFoundError(UserError, FileNotFoundError):
    """A split the switcher or the hybrid evaluation needs has not been labelled."""


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    reporting.ensure_workdir(workdir)
    reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    cfg = config.label
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_global_batch(cfg.batch_size, mesh)
    if cfg.chunk_size % cfg.batch_size:
        raise ValueError(f"config.label.chunk_size={cfg.chunk_size} must be a multiple of "
                         f"config.label.batch_size={cfg.batch_size}")

    edge = model_store.load(config.edge.path, role="edge")
    cloud = model_store.load(config.cloud.path, role="cloud")
    builder = pipeline.prepare(config.data)
    cloud = zero_shot_for(cloud, config.cloud.path, builder)
    _check_same_models(workdir, edge, cloud, config.data)
    infer = jax.jit(functools.partial(_edge_and_cloud, edge, cloud),
                    in_shardings=parallel.batch_sharded(mesh),
                    out_shardings=parallel.batch_sharded(mesh))

    summary: dict[str, Any] = {"splits": {}, "devices": parallel.describe()}
    for split_name in cfg.splits:
        split = pipeline.open_split(builder, config.data, split_name)
        _check_classes(split, edge, cloud)
        stats = _label_split(infer, split, cfg, mesh, os.path.join(workdir, split_name))
        summary["splits"][split_name] = stats
    main = summary["splits"].get(cfg.switcher_split) or next(iter(summary["splits"].values()))
    summary.update(num_labelled=main["num_clips"], agreement_rate=main["agreement_rate"])
    reporting.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def zero_shot_for(model: model_store.LoadedModel, directory: str,
                  builder) -> model_store.LoadedModel:
    """A zero-shot cloud (X-CLIP) answers over the dataset's own class names."""
    names = tuple(builder.info.features["label"].names)
    if model.model_config.name != "xclip" or model.class_names == names:
        return model
    from dmd_jax import convert  # only zero-shot clouds need the text tower's tools

    reporting.log(f"[label] zero-shot cloud: prompting it with the dataset's {len(names)} "
                  "class names")
    return convert.with_classes(model, names, directory)


def _check_same_models(workdir: str, edge: model_store.LoadedModel,
                       cloud: model_store.LoadedModel, data: ml_collections.ConfigDict) -> None:
    """Labels already in `workdir` are only reused if the same models and data made them."""
    made_by = {"edge": reporting.fingerprint(edge.variables),
               "cloud": reporting.fingerprint(cloud.variables),
               "data": {k: data[k] for k in ("name", "seed", "frames", "size", "root")}}
    path = os.path.join(workdir, "labelled_with.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(made_by)):
            raise UserError(
                f"the labels in {workdir!r} were made with other models or data ({path}); "
                "use a fresh --workdir, or delete that directory to relabel")
    reporting.write_json(path, made_by)


def _edge_and_cloud(edge: model_store.LoadedModel, cloud: model_store.LoadedModel,
                    video: jnp.ndarray) -> dict[str, jnp.ndarray]:
    edge_logits, edge_features = edge.classify(video)
    cloud_logits, _ = cloud.classify(video)
    return {"edge_logits": edge_logits.astype(jnp.float32),
            "edge_features": edge_features.astype(jnp.float32),
            "cloud_logits": cloud_logits.astype(jnp.float32)}


def _check_classes(split: pipeline.Split, edge: model_store.LoadedModel,
                   cloud: model_store.LoadedModel) -> None:
    for role, model in (("edge", edge), ("cloud", cloud)):
        if model.class_names != split.class_names:
            raise UserError(
                f"the {role} model ({model.source}) predicts classes {model.class_names[:4]}... "
                f"but split {split.name!r} has {split.class_names[:4]}...; train or convert the "
                f"{role} for this dataset's classes")


def _label_split(infer, split: pipeline.Split, cfg: ml_collections.ConfigDict, mesh,
                 out_dir: str) -> dict[str, Any]:
    """Labels every chunk of `split` not yet on disk; returns the split's statistics."""
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
    chunks = range(0, len(split), cfg.chunk_size)
    done = np.array([_chunk_done(out_dir, start, len(split), cfg) for start in chunks])
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
        for batch in pipeline.prefetch(pipeline.eval_batches(split, cfg.batch_size, rows,
                                                             start, stop)):
            outputs = parallel.fetch(infer(parallel.to_global(batch["video"], mesh)))
            host = parallel.gather_host_rows({k: batch[k] for k in ("label", "id", "mask")})
            keep = host["mask"].astype(bool)
            parts.append({**{k: v[keep] for k, v in outputs.items()},
                          "label": host["label"][keep], "id": host["id"][keep]})
        chunk = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        reporting.save_npz(_chunk_path(out_dir, start), **chunk, **targets(chunk))
        done_clips += stop - start
        rate = done_clips / (time.perf_counter() - t0)
        reporting.log(f"[label] {split.name}: clips {stop}/{len(split)}  {rate:.0f} clips/s  "
                      f"ETA {_eta(len(split) - stop, rate)}")
    labels = read_split(os.path.dirname(out_dir), split.name)
    stats = {
        "num_clips": int(len(labels["id"])),
        "agreement_rate": float(labels["hard"].mean()),
        "edge_accuracy": _accuracy(labels["edge_logits"], labels["label"]),
        "cloud_accuracy": _accuracy(labels["cloud_logits"], labels["label"]),
        "clips_per_sec": float(done_clips / (time.perf_counter() - t0)) if done_clips else None,
    }
    reporting.log(f"[label] {split.name}: {stats['num_clips']} clips, agreement "
                  f"{stats['agreement_rate']:.3f}, edge accuracy {stats['edge_accuracy']:.3f}, "
                  f"cloud accuracy {stats['cloud_accuracy']:.3f}")
    return stats


def targets(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The switcher targets of METHODS.md §1 from edge and cloud logits (and labels)."""
    edge_class = outputs["edge_logits"].argmax(-1)
    cloud_probs = jax.nn.softmax(jnp.asarray(outputs["cloud_logits"]), axis=-1)
    soft = np.take_along_axis(np.asarray(cloud_probs), edge_class[:, None], axis=-1)[:, 0]
    labelled = outputs["label"] >= 0
    return {
        "hard": (edge_class == outputs["cloud_logits"].argmax(-1)).astype(np.float32),
        "soft": soft.astype(np.float32),
        "ground_truth": np.where(labelled, edge_class == outputs["label"], -1).astype(np.float32),
    }


def read_split(label_dir: str, split: str) -> dict[str, np.ndarray]:
    """All labelled clips of `split`, in id order; fails clearly if any chunk is missing."""
    paths = sorted(glob.glob(os.path.join(label_dir, split, "chunk_*.npz")))
    if not paths:
        raise LabelsNotFoundError(
            f"no labels for split {split!r} in {label_dir!r}: run the label job with "
            f"--workdir={label_dir} (and '{split}' in config.label.splits) first")
    chunks = [dict(np.load(p)) for p in paths]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    if not np.array_equal(out["id"], np.arange(len(out["id"]))):
        raise LabelsNotFoundError(
            f"labels of split {split!r} in {label_dir!r} are incomplete (a chunk is missing): "
            "run the label job on that workdir again to finish them")
    return out


def _chunk_path(out_dir: str, start: int) -> str:
    return os.path.join(out_dir, f"chunk_{start:08d}.npz")


def _chunk_done(out_dir: str, start: int, num_clips: int, cfg: ml_collections.ConfigDict) -> bool:
    """A chunk counts only if it is readable and holds exactly its clips."""
    path = _chunk_path(out_dir, start)
    if not os.path.exists(path):
        return False
    try:
        ids = np.load(path)["id"]
    except Exception:  # noqa: BLE001 - unreadable: recompute it
        return False
    return np.array_equal(ids, np.arange(start, min(start + cfg.chunk_size, num_clips)))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    labelled = labels >= 0
    if not labelled.any():
        return None
    return float(np.mean(logits[labelled].argmax(-1) == labels[labelled]))


def _eta(remaining: int, rate: float) -> str:
    return f"{remaining / rate:.0f}s" if rate > 0 else "?"
