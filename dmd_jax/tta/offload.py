"""Offloading inside an adaptation stream: DMD's router and cloud on a corrupted stream.

What the `dmd` (offloading alone) and `dmd_cema` (offloading and adaptation from one
upload) methods share. The router and threshold are an operating point's (the
`evaluate_hybrid` job's `operating_point.json`, calibrated on clean clips; under a shift
its scores move and the offload rate with them, as on a deployed edge). The offloaded
clips travel as the edge stores them or, with `upload_crf`, as H.264 at that CRF, and the
cloud classifies what it decodes; their answer is the cloud's, fused with the edge's
log-probabilities by the operating point's `fusion_weight`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmd_jax import files, hybrid, model_store, parallel, uploads
from dmd_jax.errors import UserError
from dmd_jax.tta.adaptable import Adaptable

SETTINGS = ("switcher_dir", "operating_point", "upload_crf")
MAX_CLOUD_BATCH = 64  # the cloud's forward runs on padded buckets up to this many clips


@dataclasses.dataclass(frozen=True)
class Sent:
    """What one batch sent to the cloud and what came back."""

    offloaded: np.ndarray  # (B,) bool
    clips: np.ndarray  # (n, T, H, W, 3) uint8, the offloaded clips as the cloud decoded them
    cloud_logits: np.ndarray  # (n, C)
    bytes_up: int  # on the link: uint8, or the mp4s' size with upload_crf


class OffloadConfigError(UserError, ValueError):
    """Offloading's settings name no usable operating point."""


class Offloader:
    """Routes a batch from the edge's outputs and has the cloud answer the routed clips."""

    def __init__(self, edge: Adaptable, cloud: model_store.LoadedModel,
                 cfg: ml_collections.ConfigDict, mesh):
        if not cfg.operating_point or not files.path(cfg.operating_point).exists():
            raise OffloadConfigError(f"operating point {cfg.operating_point!r} not found: offloading "
                            "needs the evaluate_hybrid job's operating_point.json (and "
                            "switcher_dir, the train_switcher job's workdir)")
        self.router, self.threshold = hybrid.load_router(
            cfg.operating_point, cfg.switcher_dir, edge.model.fingerprint)
        self.fusion_weight = float(files.read_json(cfg.operating_point)["fusion_weight"])
        self.crf = int(cfg.upload_crf)
        if self.crf:
            uploads.check_crf(self.crf, "upload_crf")
        replicated, batch = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        self._router_params = parallel.put_replicated(self.router.params, mesh)
        self._score = jax.jit(self.router.score, in_shardings=(replicated, batch, batch))
        forward = jax.jit(hybrid.cloud_forward(cloud))
        self._cloud = hybrid.bucketed(lambda clips: forward(cloud.variables, clips),
                                      MAX_CLOUD_BATCH)

    def route(self, features: jax.Array, logits: np.ndarray) -> np.ndarray:
        """(B,) bool: the clips whose router score is below the threshold."""
        scores = self._score(self._router_params, features, jnp.asarray(logits))
        return np.asarray(parallel.fetch(scores)) < self.threshold

    def send(self, clips: jax.Array, offloaded: np.ndarray,
             cloud: Callable[[np.ndarray], np.ndarray] | None = None) -> Sent:
        """The offloaded clips up (encoded when `upload_crf`), the logits of `cloud`
        (uint8 clips -> logits; default: the cloud model as trained) back."""
        if not offloaded.any():
            empty = np.zeros((0, *clips.shape[1:]), np.uint8)
            return Sent(offloaded, empty, np.zeros((0, 0), np.float32), 0)
        stored = np.asarray(parallel.fetch(clips))[offloaded]
        if self.crf:
            decoded, sizes = uploads.encode_decode(stored, self.crf)
            size = int(sizes.sum())
        else:
            decoded, size = stored, int(stored.nbytes)
        return Sent(offloaded, decoded, (cloud or self._cloud)(decoded), size)

    def answers(self, edge_logits: np.ndarray, sent: Sent) -> np.ndarray:
        """(B, C) scores whose argmax is the hybrid's prediction: the edge's logits, and
        for offloaded clips `w log p_cloud + (1 - w) log p_edge`."""
        out = np.array(edge_logits, np.float32, copy=True)
        if sent.offloaded.any():
            log_p = lambda x: np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), -1))
            w = self.fusion_weight
            out[sent.offloaded] = (w * log_p(sent.cloud_logits)
                                   + (1 - w) * log_p(edge_logits[sent.offloaded]))
        return out
