"""The DMD label format: what the `label` job writes and the switcher and hybrid jobs read.

A label directory holds one folder per split of chunk files,
`<split>/chunk_NNNNNNNN.npz`, each a fixed range of clips (`id`, `label`, the edge's
`edge_features` and `edge_logits`, the cloud's `cloud_logits`, and the switcher targets
of METHODS.md §1), and a `stamp.json` (`dmd_jax.stamps`) saying which models, data and
settings made them:

- `hard`: 1 if edge and cloud predict the same class (no human label used);
- `soft`: the cloud's probability of the edge's class (no human label used);
- `ground_truth`: 1 if the edge is right (ablation only; -1 where a clip has no label).

and, made by the switcher job from the stored logits (`relaxed_targets`), Hybrid LLM's
relaxed agreement (Ding et al., ICLR 2024): `relaxed`, 1 if the cloud's probability of
the edge's class is within `t` of its top probability, `1[p_C(y_E) >= max p_C - t]`, with
`t` chosen on the calibration split to balance the labels (their choice: the `t`
maximising the mean pairwise difference of the labels, i.e. a positive rate nearest 1/2;
no human label used). `t = 0` is `hard`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import files, stamps
from dmd_jax.errors import UserError

TARGETS = ("hard", "soft", "ground_truth", "relaxed")


class LabelsNotFoundError(UserError, FileNotFoundError):
    """A split the switcher or the hybrid evaluation needs has not been labelled."""


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


def relaxation_gap(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Per clip, the cloud's top probability minus its probability of the edge's class."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(outputs["cloud_logits"]), axis=-1))
    edge = np.take_along_axis(probs, outputs["edge_logits"].argmax(-1)[:, None], axis=-1)[:, 0]
    return probs.max(-1) - edge


def balanced_relaxation(calibration: dict[str, np.ndarray]) -> float:
    """Hybrid LLM's `t`: among the thresholds that change the labels (0 and every gap),
    the one whose positive rate on the calibration clips is nearest 1/2 (the smallest
    such); 0 where agreement alone already reaches 1/2."""
    gaps = relaxation_gap(calibration)
    candidates = np.unique(np.concatenate([[0.0], gaps]))
    rates = np.asarray([np.mean(gaps <= t) for t in candidates])
    return float(candidates[np.argmin(np.abs(rates - 0.5))])


def relaxed_targets(data: dict[str, np.ndarray], t: float) -> np.ndarray:
    return (relaxation_gap(data) <= t).astype(np.float32)


def chunk_path(label_dir: str, split: str, start: int):
    return files.path(label_dir) / split / f"chunk_{start:08d}.npz"


def chunk_paths(label_dir: str, split: str) -> list:
    folder = files.path(label_dir) / split
    return sorted(folder.glob("chunk_*.npz")) if folder.exists() else []


def chunk_done(label_dir: str, split: str, start: int, stop: int) -> bool:
    """A chunk counts only if it is readable and holds exactly clips `start..stop`."""
    path = chunk_path(label_dir, split, start)
    if not path.exists():
        return False
    try:
        ids = files.load_npz(path)["id"]
    except Exception:  # noqa: BLE001 - unreadable: recompute it
        return False
    return np.array_equal(ids, np.arange(start, stop))


def stamp_digest(label_dir: str) -> str:
    """The identity of a label directory's contents (its stamp's digest), for the stamps
    of what is made from them (switchers, operating points)."""
    stamp = files.path(label_dir) / stamps.STAMP_FILE
    if not stamp.exists():
        raise LabelsNotFoundError(
            f"{label_dir!r} has no {stamps.STAMP_FILE}: it is not a label job's workdir (or "
            "an older dmd_jax made it); run the label job with --workdir pointing there")
    return stamps.digest(files.read_json(stamp))


def eval_views(label_dir: str) -> int:
    """How many evaluation views each clip's labels averaged (`config.data.views`, recorded
    in the label job's stamp): what every deployed forward pass costs, times one clip's."""
    stamp = files.read_json(files.path(label_dir) / stamps.STAMP_FILE)
    views = stamp["settings"]["data"].get("views") or {}
    return int(views.get("temporal", 1)) * int(views.get("spatial", 1))


def read_split(label_dir: str, split: str) -> dict[str, np.ndarray]:
    """All labelled clips of `split`, in id order; fails clearly if any chunk is missing
    or damaged."""
    paths = chunk_paths(label_dir, split)
    if not paths:
        raise LabelsNotFoundError(
            f"no labels for split {split!r} in {label_dir!r}: run the label job with "
            f"--workdir={label_dir} (and '{split}' in config.label.splits) first")
    chunks = []
    for path in paths:
        try:
            chunks.append(files.load_npz(path))
        except Exception as err:  # noqa: BLE001 - a damaged file, whatever numpy says
            raise LabelsNotFoundError(
                f"label chunk {path} is damaged ({type(err).__name__}: {err}); run the label "
                f"job on {label_dir!r} again: it recomputes damaged chunks") from err
    out: dict[str, Any] = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    if not np.array_equal(out["id"], np.arange(len(out["id"]))):
        raise LabelsNotFoundError(
            f"labels of split {split!r} in {label_dir!r} are incomplete (a chunk is missing): "
            "run the label job on that workdir again to finish them")
    return out
