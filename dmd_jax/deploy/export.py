"""Writes the deployed edge (the format is in `dmd_jax.deploy`): the fp32 graph traced
through PyTorch, its int8 form, the starting normalisation parameters, the manifest last."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import math
import os
import tempfile
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

from dmd_jax import files, reporting, routers
from dmd_jax.deploy import runtime
from dmd_jax.errors import UserError
from dmd_jax.model_store import LoadedModel

FILES = {"fp32": "edge.onnx", "int8": "edge_int8.onnx"}
OPSET = 17
# The int8 graph quantises the convolutions and matrix products (weights per channel,
# activations per tensor, calibrated); the normalisation, whose parameters are inputs,
# stays float.
QUANTISED_OPS = ("Conv", "MatMul", "Gemm")


def export(model: LoadedModel, router: routers.Router, threshold: float, directory: str, *,
           normalization: str, calibration: np.ndarray | None, batch_size: int,
           stamp: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the artifact to `directory`; `calibration` (uint8 clips), when given, makes
    the int8 graph. Returns the manifest."""
    torch, torch_edge = _exporter()
    graph = torch_edge.EdgeGraph(model, router, normalization)
    target = files.path(directory)
    files.remove(target / runtime.MANIFEST)  # incomplete until the manifest is written
    written: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = os.path.join(scratch, FILES["fp32"])
        with warnings.catch_warnings():  # the tracer's notes on Python control flow
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, torch_edge.example_inputs(graph, batch_size,
                                                               model.input_shape),
                              fp32, dynamo=False, opset_version=OPSET,
                              input_names=["clips", *graph.inputs],
                              output_names=list(runtime.OUTPUTS),
                              dynamic_axes={k: {0: "batch"}
                                            for k in ("clips", *runtime.OUTPUTS)})
        graphs = {"fp32": fp32}
        if calibration is not None:
            graphs["int8"] = os.path.join(scratch, FILES["int8"])
            quantise(fp32, graphs["int8"], calibration, graph.inputs, batch_size)
        for variant, path in graphs.items():
            data = open(path, "rb").read()
            files.write_bytes(target / FILES[variant], data)
            written[variant] = {"name": FILES[variant], "sha256": hashlib.sha256(data).hexdigest(),
                                "bytes": len(data)}
    buffer = io.BytesIO()
    np.savez(buffer, **graph.inputs)
    files.write_bytes(target / runtime.PARAMETERS, buffer.getvalue())
    manifest = {
        "format": runtime.FORMAT, "class_names": list(model.class_names),
        "input_shape": list(model.input_shape), "normalization": normalization,
        "router": router.spec,
        "threshold": threshold if math.isfinite(threshold) else None,
        "offload_everything": threshold == math.inf,
        "inputs": {k: list(v.shape) for k, v in graph.inputs.items()},
        "outputs": list(runtime.OUTPUTS), "files": written,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "onnx", "onnxruntime")},
        "stamp": dict(stamp),
    }
    files.write_json(target / runtime.MANIFEST, manifest)
    reporting.log(f"[export_edge] {directory}: {', '.join(written)} "
                  f"({normalization} normalisation, {len(graph.inputs)} parameter inputs)")
    return manifest


def _exporter():
    """torch and the graph builder, or one clear error saying what to install."""
    try:
        import onnx  # noqa: F401 - torch.onnx needs it
        import onnxruntime  # noqa: F401
        import torch
        from dmd_jax.deploy import torch_edge
    except ImportError as err:
        raise UserError(f"exporting the edge needs PyTorch, pytorchvideo, onnx and ONNX "
                        f"Runtime ({err}): pip install 'dmd_jax[deploy]' (torch exactly "
                        "2.13.0)") from err
    return torch, torch_edge


def quantise(fp32: str, int8: str, clips: np.ndarray, parameters: Mapping[str, np.ndarray],
             batch_size: int) -> None:
    """ONNX Runtime's static QDQ quantisation, its ranges calibrated on `clips`."""
    from onnxruntime import quantization as q

    class Clips(q.CalibrationDataReader):
        def __init__(self):
            self._batches: Iterator[np.ndarray] = iter(
                [clips[i:i + batch_size] for i in range(0, len(clips), batch_size)])

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {"clips": batch, **parameters}

    q.quantize_static(fp32, int8, Clips(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      op_types_to_quantize=list(QUANTISED_OPS),
                      calibrate_method=q.CalibrationMethod.MinMax)
