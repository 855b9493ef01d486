"""Hybrid edge-cloud inference: the edge answers, a router decides who else looks.

    hybrid = HybridClassifier.from_dirs(edge_dir, switcher_workdir, operating_point, cloud_dir)
    result = hybrid(clips)            # uint8 (N, T, H, W, 3)
    result.predictions, result.offloaded, result.gflops

The edge and the router (any `dmd_jax.routers.Router`: a trained switcher or the edge's
own confidence) run as one jitted function, the device-side half, with their weights as
arguments. The cloud is any callable from uint8 clips to logits; by default a local
jitted forward of a model directory, so a remote service can replace it without touching
the rest. Offloaded clips get the cloud's answer, fused with the edge's log-probabilities
when `fusion_weight < 1` (METHODS.md §1, cloud-side fusion).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import files, flops, model_store, routers
from dmd_jax.errors import UserError

CloudFn = Callable[[np.ndarray], np.ndarray]  # may raise CloudUnavailable


class CloudUnavailable(Exception):
    """A cloud that gave no answer; the hybrid answers those clips at the edge."""


class OperatingPointMismatchError(UserError, ValueError):
    """An operating point calibrated for other models than the ones given."""


@dataclasses.dataclass(frozen=True)
class HybridResult:
    predictions: np.ndarray  # (N,) class indices
    offloaded: np.ndarray  # (N,) bool: which clips went to the cloud
    router_scores: np.ndarray  # (N,) the router's score (e.g. P(aligned)); low: offloaded
    gflops: float  # spent on this batch: every clip's edge + router, the offloaded clips' cloud
    upload_bytes: int  # the offloaded clips, as uint8
    fallback: np.ndarray | None = None  # (N,) bool: routed to the cloud, answered by the edge


def fuse(edge_logits: np.ndarray, cloud_logits: np.ndarray, weight: float) -> np.ndarray:
    """`argmax(w log p_cloud + (1 - w) log p_edge)`; `w = 1` is the cloud alone."""
    log_p_edge = jax.nn.log_softmax(jnp.asarray(edge_logits, jnp.float32), -1)
    log_p_cloud = jax.nn.log_softmax(jnp.asarray(cloud_logits, jnp.float32), -1)
    return np.asarray(jnp.argmax(weight * log_p_cloud + (1.0 - weight) * log_p_edge, -1))


def cloud_forward(model: model_store.LoadedModel):
    """`(variables, uint8 clips) -> logits`: the cloud's forward pass, weights as arguments."""
    return lambda variables, clips: model.apply(variables, clips)[0]


def cloud_gflops(model: model_store.LoadedModel) -> float:
    """GFLOPs per clip of the cloud's forward pass (compiled on shapes only)."""
    clip = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.uint8)
    return flops.gflops(cloud_forward(model), flops.abstract(model.variables), clip)


def local_cloud(model: model_store.LoadedModel) -> CloudFn:
    """The cloud model run in this process: uint8 clips -> logits."""
    forward = jax.jit(cloud_forward(model))
    return lambda clips: np.asarray(forward(model.variables, clips))


def edge_and_router(edge: model_store.LoadedModel, router: routers.Router):
    """`(edge variables, router params, uint8 clips) -> (logits, scores)`: the device half."""
    def forward(edge_variables, router_params, video):
        logits, features = edge.apply(edge_variables, video)
        return logits, router.score(router_params, features, logits)
    return forward


class HybridClassifier:
    """Edge + router on every clip; the cloud only where the router's score < threshold."""

    def __init__(self, edge: model_store.LoadedModel, router: routers.Router, threshold: float,
                 cloud: CloudFn, cloud_gflops_per_clip: float, fusion_weight: float = 1.0):
        self.edge, self.router = edge, router
        self.threshold, self.fusion_weight = threshold, fusion_weight
        self.cloud, self.cloud_gflops_per_clip = cloud, cloud_gflops_per_clip
        forward = edge_and_router(edge, router)
        self._device_half = jax.jit(forward)
        one_clip = jax.ShapeDtypeStruct((1, *edge.input_shape), jnp.uint8)
        self.edge_gflops_per_clip = flops.gflops(
            forward, flops.abstract(edge.variables), flops.abstract(router.params), one_clip)

    def edge_and_router(self, clips: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """The device-side half on a batch: `(edge logits, router scores)`."""
        return self._device_half(self.edge.variables, self.router.params, clips)

    @classmethod
    def from_dirs(cls, edge_dir: str, switcher_dir: str, operating_point: str,
                  cloud_dir: str, cloud: CloudFn | None = None,
                  runtime: Mapping[str, Any] | None = None) -> "HybridClassifier":
        """Builds the system that `evaluate_hybrid` calibrated (`operating_point.json`
        names its router; a learned one is read from `switcher_dir`, the train_switcher
        job's workdir); refuses models other than the ones it was calibrated for.

        A zero-shot cloud (X-CLIP) is prompted with the edge's class names. `runtime`: how
        the models run (a `config.runtime`; each model's defaults if None)."""
        point = files.read_json(operating_point)
        edge = model_store.load(edge_dir, role="edge", runtime=runtime)
        router, threshold = load_router(operating_point, switcher_dir, edge.fingerprint)
        cloud_model = model_store.load(cloud_dir, role="cloud", runtime=runtime,
                                       class_names=edge.class_names)
        return cls(edge, router, threshold, cloud or local_cloud(cloud_model),
                   cloud_gflops(cloud_model), point["fusion_weight"])

    def __call__(self, clips: np.ndarray) -> HybridResult:
        edge_logits, scores = (np.asarray(x) for x in self.edge_and_router(clips))
        offloaded = scores < self.threshold
        predictions = edge_logits.argmax(-1)
        fallback = np.zeros(len(clips), bool)
        if offloaded.any():
            try:
                cloud_logits = self.cloud(clips[offloaded])
            except CloudUnavailable:  # the edge's own answer; the clip counts as not offloaded
                fallback, offloaded = offloaded, np.zeros(len(clips), bool)
            else:
                predictions[offloaded] = fuse(edge_logits[offloaded], cloud_logits,
                                              self.fusion_weight)
        spent = len(clips) * self.edge_gflops_per_clip + offloaded.sum() * self.cloud_gflops_per_clip
        return HybridResult(predictions, offloaded, scores, float(spent),
                            int(clips[offloaded].nbytes), fallback)


def load_router(operating_point: str, switcher_dir: str,
                edge_fingerprint: str) -> tuple[routers.Router, float]:
    """The router and threshold of an operating point (`evaluate_hybrid`'s
    `operating_point.json`; a learned router read from `switcher_dir`), refused when it
    was calibrated for another edge or router."""
    point = files.read_json(operating_point)
    router = routers.load(point["router"], routers.Context(switcher_dir=switcher_dir))
    for what, expected, actual in (("edge", point.get("edge_fingerprint"), edge_fingerprint),
                                   ("router", point.get("router_fingerprint"),
                                    router.fingerprint)):
        if expected is not None and expected != actual:
            raise OperatingPointMismatchError(
                f"{operating_point} was calibrated for another {what} (fingerprint "
                f"{expected}, given {actual}); run evaluate_hybrid for these models")
    return router, _threshold(point)


def bucketed(forward: Callable[[np.ndarray], np.ndarray], max_batch: int):
    """`forward` on any number of clips, run in chunks padded to a power of two <=
    `max_batch`: the compiled shapes stay few whatever number of clips is offloaded."""
    def run(clips: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(clips), max_batch):
            chunk = clips[start:start + max_batch]
            size = min(1 << (len(chunk) - 1).bit_length(), max_batch)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])
            out.append(np.asarray(forward(padded))[:len(chunk)])
        return np.concatenate(out)
    return run


def _threshold(point: dict) -> float:
    """The operating point's threshold. JSON holds no infinities, so an operating point
    that offloads nothing (or everything) stores null: decode it from its offload rate."""
    if point["threshold"] is not None:
        return float(point["threshold"])
    return math.inf if point["target_offload"] >= 1.0 else -math.inf
