"""The deployed edge (the `export_edge` job's artifact: edge + router as one ONNX graph,
run by ONNX Runtime) against JAX and PyTorch eager on the same CPU and clips.

    python -m benchmarks.edge_export [--quick]

For each normalisation the deployed edge supports ('batch': each batch's own statistics,
CEMA's edge; 'running': running statistics, both kinds of parameters graph inputs), the
fp32 and int8 graphs on 1 and 2 threads; JAX (jit) and PyTorch eager (pytorchvideo's
X3D with its own BatchNorm layers, same weights, same router) on the same batches. One
more graph measures what keeping the normalisation parameters as inputs costs: the
running-statistics network exported with them as constants (ONNX Runtime then folds
each BatchNorm into its convolution), edge only. The models are the demo's edge and
operating point when `make demo` has run, else random weights and `max_prob`.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from benchmarks import common
from benchmarks.demo_models import DEMO_CLIP as CLIP, EDGE_DIR, demo_or_random
from configs import demo
from dmd_jax import hybrid, parallel, routers
from dmd_jax.data import synthetic
from dmd_jax.deploy import export, runtime
from dmd_jax.jobs import export_edge

SWITCHER_DIR, POINT = "runs/demo/switcher", "runs/demo/hybrid/operating_point.json"
BATCH = 16


def labelled_clips(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Clean synthetic clips of the demo's test distribution (ceiling cameras included)."""
    render = synthetic.RenderConfig(frames=CLIP[0], height=CLIP[1], width=CLIP[2])
    rng = np.random.default_rng(0)
    labels = rng.integers(len(synthetic.CLASSES), size=count)
    clips = np.stack([synthetic.render_clip(rng, int(y), render)[0] for y in labels])
    return clips, labels


def rate(fn: Callable[[np.ndarray], object], batches: list[np.ndarray], seconds: float,
         windows: int = 5) -> float:
    """Clips/s: the best of `windows` timed windows (this shared CPU's speed drifts; the
    best window is the least disturbed), after one warm-up call."""
    fn(batches[0])
    best = 0.0
    for _ in range(windows):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            fn(batches[done % len(batches)])
            done += 1
        best = max(best, done * BATCH / (time.perf_counter() - start))
    return best


def torch_eager(model, router, normalization: str, threads: int):
    """pytorchvideo's X3D with the same weights and its own BatchNorm layers (in training
    mode for batch statistics), the router's PyTorch form after it."""
    import torch
    from dmd_jax.deploy import torch_edge
    torch.set_num_threads(threads)
    graph = torch_edge.EdgeGraph(model, router, normalization)
    for module in graph.net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.__class__ = torch.nn.BatchNorm3d  # PyTorch's own kernels
            if normalization == "batch":
                module.train()
                module.momentum = 0.0  # batch statistics; the running ones unchanged

    def run(clips):
        with torch.no_grad():
            x = (torch.from_numpy(clips).float() / 255 - graph.mean) / graph.std
            logits, features = graph._outputs(graph.net, x.permute(0, 4, 1, 2, 3))
            return logits.numpy(), graph.score(features, logits).numpy()
    return run


def folded_graph(model, path: str) -> None:
    """The running-statistics edge with its normalisation as constants (foldable)."""
    import torch
    from dmd_jax.deploy import torch_edge
    graph = torch_edge.EdgeGraph(model, routers.load("max_prob", routers.Context()), "running")
    for module in graph.net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.__class__ = torch.nn.BatchNorm3d
    net = graph.net.eval()
    torch.onnx.export(net, (torch.zeros((BATCH, CLIP[-1], *CLIP[:-1])),), path, dynamo=False,
                      input_names=["x"], output_names=["logits"])


def run(quick: bool) -> common.Section:
    model = demo_or_random(EDGE_DIR, demo.EDGE, 0)
    if model.source != "random" and os.path.exists(POINT):
        router, threshold = hybrid.load_router(POINT, SWITCHER_DIR, model.fingerprint)
    else:
        router, threshold = routers.load("max_prob", routers.Context()), 0.5
    clips, labels = labelled_clips(BATCH * (4 if quick else 32))
    batches = [clips[i:i + BATCH] for i in range(0, len(clips), BATCH)]
    slices = [slice(i, i + BATCH) for i in range(0, len(clips), BATCH)]
    calibration, _ = labelled_clips(BATCH * (2 if quick else 16))
    seconds = 1.0 if quick else 5.0
    folder = tempfile.mkdtemp()
    rows, export_s = [], {}
    for normalization in runtime.NORMALIZATIONS:
        directory = os.path.join(folder, normalization)
        start = time.perf_counter()
        export.export(model, router, threshold, directory, normalization=normalization,
                      calibration=calibration[::-1], batch_size=BATCH, stamp={})
        export_s[normalization] = time.perf_counter() - start
        reference = export_edge.jax_outputs(model, router, normalization, clips, slices)
        group = []
        for threads in (1, 2):
            eager = torch_eager(model, router, normalization, threads)
            logits = np.concatenate([eager(b)[0] for b in batches])
            group.append([f"PyTorch eager ({normalization})", threads,
                          rate(eager, batches, seconds), _accuracy(logits, labels),
                          _diff(logits, reference)])
        for engine, variant in itertools.product(sorted(runtime.ENGINES), runtime.VARIANTS):
            for threads in (1, 2):
                deployed = runtime.DeployedEdge(directory, variant, threads, engine)
                logits = np.concatenate([deployed.predict(b).logits for b in batches])
                group.append([f"deployed edge, {engine} {variant} ({normalization})", threads,
                              rate(deployed.predict, batches, seconds),
                              _accuracy(logits, labels), _diff(logits, reference)])
        forward = export_edge.jax_forward(model, router, normalization)
        jitted = lambda x: jax.block_until_ready(forward(x))  # noqa: E731
        group.append([f"JAX jit ({normalization})", "all", rate(jitted, batches, seconds),
                      _accuracy(reference["logits"], labels), 0.0])
        jax_rate = group[-1][2]
        eager_rate = {row[1]: row[2] for row in group[:2]}
        for row in group:
            row += [common.ratio(row[2], jax_rate),
                    common.ratio(row[2], eager_rate.get(row[1], eager_rate[2]))]
        rows += group
    folded = os.path.join(folder, "folded.onnx")
    folded_graph(model, folded)
    for threads in (1, 2):
        session = _session(folded, threads)
        feed = lambda b: session.run(None, {"x": _ncdhw(b)})  # noqa: E731
        rows.append(["running statistics as constants (edge only, folded)", threads,
                     rate(feed, batches, seconds), None, None, None, None])
    return common.Section(
        title="Edge export: the deployed edge (ONNX Runtime) vs JAX vs PyTorch on CPU",
        command="python -m benchmarks.edge_export",
        setup=(f"Edge: {EDGE_DIR if model.source != 'random' else 'random init'} (demo X3D, "
               f"width 0.5) with router {router.spec}; batches of {BATCH} clips (8x32x32), "
               f"{len(clips)} clean synthetic clips; accuracy on them, and the largest logit "
               "difference from JAX with the same normalisation. Export through PyTorch "
               f"(`torch.onnx`): {export_s['batch']:.1f} s / {export_s['running']:.1f} s with "
               f"int8 (static QDQ, {len(calibration)} calibration clips). Ratios: to JAX of "
               "the same normalisation, and to PyTorch eager of the same normalisation and "
               "threads."),
        columns=["runtime", "threads", "clips/s", "accuracy", "max logit diff vs JAX",
                 "vs JAX", "vs PyTorch eager"],
        rows=rows, devices=parallel.describe())


def _session(path: str, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ncdhw(clips: np.ndarray) -> np.ndarray:
    x = (clips.astype(np.float32) / 255 - 0.45) / 0.225
    return np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3)))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == labels))


def _diff(logits: np.ndarray, reference: dict[str, np.ndarray]) -> float:
    return float(np.abs(logits - reference["logits"]).max())


if __name__ == "__main__":
    common.main(run, __doc__)
