"""Hybrid edge-cloud inference: the edge answers, the switcher decides who else looks.

    hybrid = HybridClassifier.from_dirs(edge_dir, switcher_dir, operating_point, cloud_dir)
    result = hybrid(clips)            # uint8 (N, T, H, W, 3)
    result.predictions, result.offloaded, result.gflops

The edge and the switcher run as one jitted function (on the device next to the
camera, in deployment). The cloud is any callable from uint8 clips to logits; by
default a local jitted forward of a model directory, so a remote service can replace
it without touching the rest. Offloaded clips get the cloud's answer, fused with the
edge's log-probabilities when `fusion_weight < 1` (METHODS.md §1, cloud-side fusion).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import flops, model_store
from dmd_jax.models.switcher import Switcher

CloudFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class HybridResult:
    predictions: np.ndarray  # (N,) class indices
    offloaded: np.ndarray  # (N,) bool: which clips went to the cloud
    switcher_scores: np.ndarray  # (N,) P(aligned)
    gflops: float  # spent on this batch: every clip's edge + switcher, the offloaded clips' cloud
    upload_bytes: int  # the offloaded clips, as uint8


def fuse(edge_logits: np.ndarray, cloud_logits: np.ndarray, weight: float) -> np.ndarray:
    """`argmax(w log p_cloud + (1 - w) log p_edge)`; `w = 1` is the cloud alone."""
    log_p_edge = jax.nn.log_softmax(jnp.asarray(edge_logits, jnp.float32), -1)
    log_p_cloud = jax.nn.log_softmax(jnp.asarray(cloud_logits, jnp.float32), -1)
    return np.asarray(jnp.argmax(weight * log_p_cloud + (1.0 - weight) * log_p_edge, -1))


def local_cloud(model: model_store.LoadedModel) -> CloudFn:
    """The cloud model run in this process: uint8 clips -> logits."""
    forward = jax.jit(lambda video: model.classify(video)[0])
    return lambda clips: np.asarray(forward(clips))


class HybridClassifier:
    """Edge + switcher on every clip; the cloud only where `P(aligned) < threshold`."""

    def __init__(self, edge: model_store.LoadedModel, switcher: Switcher, switcher_params: Any,
                 threshold: float, cloud: CloudFn, cloud_gflops_per_clip: float,
                 fusion_weight: float = 1.0):
        self.threshold, self.fusion_weight = threshold, fusion_weight
        self.cloud, self.cloud_gflops_per_clip = cloud, cloud_gflops_per_clip

        def edge_and_switcher(video):
            logits, features = edge.classify(video)
            score = jax.nn.sigmoid(switcher.apply({"params": switcher_params}, features, logits))
            return logits, score

        self.edge_and_switcher = jax.jit(edge_and_switcher)  # the device-side half
        one_clip = jnp.zeros((1, *edge.input_shape), jnp.uint8)
        self.edge_gflops_per_clip = flops.gflops(edge_and_switcher, one_clip)

    @classmethod
    def from_dirs(cls, edge_dir: str, switcher_dir: str, operating_point: str,
                  cloud_dir: str, cloud: CloudFn | None = None) -> "HybridClassifier":
        """Builds the system that `evaluate_hybrid` calibrated (`operating_point.json`).

        A zero-shot cloud (X-CLIP) is prompted with the edge's class names."""
        from dmd_jax.jobs import switcher as switcher_job  # jobs import this module

        edge = model_store.load(edge_dir, role="edge")
        cloud_model = model_store.load(cloud_dir, role="cloud")
        if cloud_model.model_config.name == "xclip" and cloud_model.class_names != edge.class_names:
            from dmd_jax import convert
            cloud_model = convert.with_classes(cloud_model, edge.class_names, cloud_dir)
        module, params, _ = switcher_job.load(switcher_dir)
        with open(operating_point) as f:
            point = json.load(f)
        cloud_gflops = flops.gflops(
            lambda v: cloud_model.classify(v)[0],
            jnp.zeros((1, *cloud_model.input_shape), jnp.uint8))
        return cls(edge, module, params, _threshold(point), cloud or local_cloud(cloud_model),
                   cloud_gflops, point["fusion_weight"])

    def __call__(self, clips: np.ndarray) -> HybridResult:
        edge_logits, scores = (np.asarray(x) for x in self.edge_and_switcher(clips))
        offloaded = scores < self.threshold
        predictions = edge_logits.argmax(-1)
        if offloaded.any():
            cloud_logits = self.cloud(clips[offloaded])
            predictions[offloaded] = fuse(edge_logits[offloaded], cloud_logits,
                                          self.fusion_weight)
        spent = len(clips) * self.edge_gflops_per_clip + offloaded.sum() * self.cloud_gflops_per_clip
        return HybridResult(predictions, offloaded, scores, float(spent),
                            int(clips[offloaded].nbytes))


def _threshold(point: dict) -> float:
    """The operating point's threshold. JSON holds no infinities, so an operating point
    that offloads nothing (or everything) stores null: decode it from its offload rate."""
    if point["threshold"] is not None:
        return float(point["threshold"])
    return math.inf if point["target_offload"] >= 1.0 else -math.inf
