"""The deployed edge on the device: ONNX Runtime and numpy only (no JAX, no PyTorch).

    edge = DeployedEdge("runs/demo/export_edge")       # or variant="int8", engine="openvino"
    answer = edge.predict(clips)                       # uint8 (B, T, H, W, 3)
    answer.offload                                     # the router's decision per clip
    edge.apply(download.norm_affine, download.stats)   # CEMA's new parameters

`apply` checks the whole download (names, shapes, finite values) before it replaces
anything, then swaps the parameters in one assignment under a lock; `predict` takes the
parameters once per call, so a download lands between batches, never inside one, and a
bad download leaves the edge as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from typing import Any, Mapping

import numpy as np

from dmd_jax.errors import UserError

MANIFEST = "deployed_edge.json"
PARAMETERS = "norm_parameters.npz"
VARIANTS = ("fp32", "int8")
FORMAT = 1
# 'batch': every BatchNorm normalises with the test batch's own statistics (the edge of
# Tent, Norm and CEMA without batch renormalisation); 'running': with running statistics,
# themselves inputs (the source model, and CEMA's edge with batch renormalisation).
NORMALIZATIONS = ("batch", "running")
OUTPUTS = ("logits", "features", "scores")


class ArtifactError(UserError, ValueError):
    """A deployed-edge directory that is incomplete, damaged or of another format."""


class DownloadError(UserError, ValueError):
    """Normalisation parameters that do not fit the deployed edge (nothing was applied)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    logits: np.ndarray  # (B, classes)
    features: np.ndarray  # (B, feature_dim): what the router read
    scores: np.ndarray  # (B,) higher: keep the edge's answer
    offload: np.ndarray  # (B,) bool: scores below the operating point's threshold

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(-1)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise ArtifactError(f"no deployed edge in {directory!r} ({MANIFEST} missing): run the "
                            "export_edge job with this directory as its workdir")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is format {manifest.get('format')!r}, this dmd_jax reads "
                            f"format {FORMAT}: export the edge again")
    return manifest


def threshold(manifest: Mapping[str, Any]) -> float:
    """JSON holds no infinities: an edge that offloads everything (nothing) stores None."""
    if manifest["threshold"] is not None:
        return float(manifest["threshold"])
    return np.inf if manifest["offload_everything"] else -np.inf


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxRuntime:
    """The graph in an ONNX Runtime CPU session (the reference engine: the export job
    checks its outputs against JAX)."""

    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(OUTPUTS), dict(feeds))


class OpenVino:
    """The same ONNX graph compiled by OpenVINO for the CPU (`pip install openvino`), in
    float32: its CPU plugin may otherwise infer in bf16. Faster than ONNX Runtime on this
    network (its 3D convolutions; BENCHMARKS.md "Edge export")."""

    def __init__(self, path: str, threads: int):
        ov = import_openvino()
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = ov.Core().compile_model(path, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: one batch at a time

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            out = self._request.infer(dict(feeds))
            # Copies: the request reuses its output buffers for the next batch.
            return [np.array(out[self._compiled.output(name)]) for name in OUTPUTS]


def import_openvino():
    """`import openvino` without its converter's usage telemetry.

    On import, `openvino.tools.ovc` sends a usage event from a child started with
    `os.fork()` (openvino_telemetry's GA4 backend): a network call nobody asked for, and a
    fork of a multithreaded process (a JAX host, the cloud server), which can deadlock the
    child and leave the parent waiting on it at exit. Hiding `openvino_telemetry` while
    openvino is first imported makes it use the stub it ships for that case; the runtime
    needs nothing from it."""
    if "openvino" not in sys.modules:
        hidden = sys.modules.get("openvino_telemetry")
        sys.modules["openvino_telemetry"] = None  # `import` raises ImportError
        try:
            import openvino  # noqa: F401
        finally:
            if hidden is None:
                del sys.modules["openvino_telemetry"]
            else:
                sys.modules["openvino_telemetry"] = hidden
    return sys.modules["openvino"]


ENGINES = {"onnxruntime": OnnxRuntime, "openvino": OpenVino}


class DeployedEdge:
    """One exported edge + router, run by `engine` (`ENGINES`) on `threads` CPU threads
    (0: the engine's default)."""

    def __init__(self, directory: str, variant: str = "fp32", threads: int = 0,
                 engine: str = "onnxruntime"):
        if variant not in VARIANTS:
            raise ArtifactError(f"variant {variant!r} is not one of {VARIANTS}")
        self.manifest = read_manifest(directory)
        entry = self.manifest["files"].get(variant)
        if entry is None:
            raise ArtifactError(f"{directory!r} holds no {variant} graph (exported with "
                                "export.int8=False?)")
        path = os.path.join(directory, entry["name"])
        if not os.path.exists(path) or sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path} is missing or not the file {MANIFEST} describes "
                                "(damaged or from another export): run export_edge again")
        if engine not in ENGINES:
            raise ArtifactError(f"engine {engine!r} is not one of {sorted(ENGINES)}")
        self.engine = ENGINES[engine](path, threads)
        self.input_shape = tuple(self.manifest["input_shape"])
        self.class_names = tuple(self.manifest["class_names"])
        self.threshold = threshold(self.manifest)
        self._shapes = {k: tuple(v) for k, v in self.manifest["inputs"].items()}
        try:
            with np.load(os.path.join(directory, PARAMETERS)) as stored:
                self._parameters = self._checked(dict(stored), partial=False)
        except (OSError, ValueError) as err:  # DownloadError is a ValueError
            raise ArtifactError(f"{os.path.join(directory, PARAMETERS)} cannot be read as this "
                                f"edge's starting parameters ({err}): run export_edge again"
                                ) from err
        self._lock = threading.Lock()
        self.updates = 0  # downloads applied

    @property
    def normalization(self) -> str:
        return self.manifest["normalization"]

    def parameters(self) -> dict[str, np.ndarray]:
        """The normalisation parameters the next batch runs with, by input name."""
        with self._lock:
            return dict(self._parameters)

    def predict(self, clips: np.ndarray) -> Answer:
        clips = np.asarray(clips)
        if clips.dtype != np.uint8 or clips.shape[1:] != self.input_shape:
            raise UserError(f"the deployed edge takes uint8 clips of shape (B, "
                            f"{', '.join(map(str, self.input_shape))}), got {clips.dtype} "
                            f"{clips.shape}: resample them first")
        with self._lock:
            parameters = self._parameters  # one download's parameters for the whole batch
        logits, features, scores = self.engine.run({"clips": clips, **parameters})
        return Answer(logits, features, scores, scores < self.threshold)

    def apply(self, norm_affine: Mapping[str, Any], stats: Any = None) -> None:
        """Swaps in a download (CEMA's `Download.norm_affine`, flat '/'-keys, and with
        running statistics `Download.stats`, the `batch_stats` tree) for the next batch."""
        given = {f"norm_affine/{k}": v for k, v in norm_affine.items()}
        if stats:
            if self.normalization != "running":
                raise DownloadError("this edge normalises with each batch's statistics "
                                    "(exported with normalization='batch'), so running "
                                    "statistics cannot be applied: export it with "
                                    "normalization='running' for CEMA with batch_renorm")
            given.update({f"stats/{k}": v for k, v in _flatten(stats).items()})
        checked = self._checked(given, partial=True)
        affine = {k for k in self._shapes if k.startswith("norm_affine/")}
        if affine - set(checked):
            raise DownloadError(f"a download must carry every normalisation scale and bias of "
                                f"the edge ({len(affine)}); this one has "
                                f"{len(affine & set(checked))}")
        with self._lock:
            self._parameters = {**self._parameters, **checked}
            self.updates += 1

    def _checked(self, given: Mapping[str, Any], partial: bool) -> dict[str, np.ndarray]:
        unknown = sorted(set(given) - set(self._shapes))
        missing = [] if partial else sorted(set(self._shapes) - set(given))
        if unknown or missing:
            raise DownloadError(f"normalisation parameters {unknown[:3] or missing[:3]} "
                                f"{'are not inputs of' if unknown else 'are missing for'} the "
                                "deployed edge: was it exported from another model?")
        out = {}
        for name, value in given.items():
            array = np.asarray(value, dtype=np.float32)
            if array.shape != self._shapes[name]:
                raise DownloadError(f"{name} has shape {array.shape}, the deployed edge "
                                    f"expects {self._shapes[name]}")
            if not np.isfinite(array).all():
                raise DownloadError(f"{name} holds non-finite values: refused, the edge keeps "
                                    "its parameters")
            out[name] = np.ascontiguousarray(array)
        return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
