"""The edge exported for a CPU device: X3D + router as one ONNX graph (jax2onnx) run by
ONNX Runtime, fp32 and int8, against JAX and PyTorch eager on the same clips.

    pip install jax2onnx onnxruntime   # not dependencies of dmd_jax: see the notes
    python -m benchmarks.edge_export [--quick]

The graph takes the clips (uint8) and every BatchNorm's scale, bias, mean and variance as
inputs, so new normalisation parameters (CEMA with batch renormalisation sends all four)
swap in by feeding other arrays; the frozen weights are its constants. Its outputs are
the logits and the router's scores. jax2onnx leaves wrong shape annotations on
intermediate values of this model (layouts after its NCDHW convolutions), which ONNX
Runtime then refuses; they are dropped and ONNX Runtime infers its own. int8: ONNX
Runtime's dynamic quantisation of the weights. Accuracy: on clean synthetic clips. The
models are the demo's edge and switcher when `make demo` has run, else random weights of
the demo architecture and the `max_prob` router.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.demo_models import DEMO_CLIP as CLIP, EDGE_DIR, demo_or_random
from configs import demo
from dmd_jax import hybrid, parallel, routers
from dmd_jax.convert import mapping, x3d as x3d_rules
from dmd_jax.data import synthetic
from dmd_jax.references import pytorchvideo_create_x3d
from dmd_jax.tta.adaptable import merge, split_norm_affine

SWITCHER_DIR, POINT = "runs/demo/switcher", "runs/demo/hybrid/operating_point.json"
BATCH = 16


def edge_and_router(model, router):
    """`(clips, *norm leaves) -> (logits, scores)` and the leaves' names and values."""
    affine, frozen = split_norm_affine(model.variables["params"])
    stats = {f"batch_stats/{k}": v for k, v in _flat(model.variables["batch_stats"]).items()}
    names = sorted(affine) + sorted(stats)
    values = {**affine, **stats}

    def forward(clips, *leaves):
        given = dict(zip(names, leaves))
        params = merge({k: v for k, v in given.items() if not k.startswith("batch_stats/")},
                       frozen)
        batch_stats = merge({k[len("batch_stats/"):]: v for k, v in given.items()
                             if k.startswith("batch_stats/")}, {})
        logits, features = model.apply({"params": params, "batch_stats": batch_stats}, clips)
        return logits, router.score(router.params, features, logits)

    return forward, names, [np.asarray(values[n]) for n in names]


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flat(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def labelled_clips(count: int) -> tuple[np.ndarray, np.ndarray]:
    render = synthetic.RenderConfig(frames=CLIP[0], height=CLIP[1], width=CLIP[2])
    rng = np.random.default_rng(0)
    labels = rng.integers(len(synthetic.CLASSES), size=count)
    clips = np.stack([synthetic.render_clip(rng, int(y), render)[0] for y in labels])
    return clips, labels


def rate(fn, batches: list[np.ndarray], seconds: float) -> float:
    fn(batches[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batches[done % len(batches)])
        done += 1
    return done * BATCH / (time.perf_counter() - start)


def onnx_session(path: str, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def torch_forward(threads: int):
    import torch
    torch.set_num_threads(threads)
    model = pytorchvideo_create_x3d()(
        input_clip_length=CLIP[0], input_crop_size=CLIP[1], model_num_class=len(synthetic.CLASSES),
        dropout_rate=0.0, width_factor=demo.EDGE["width_factor"],
        depth_factor=demo.EDGE["depth_factor"], head_dim_out=demo.EDGE["head_dim"],
        head_activation=None).eval()

    def run(clips):
        with torch.no_grad():
            x = torch.from_numpy(clips).float().div(255).sub(0.45).div(0.225).permute(0, 4, 1, 2, 3)
            return model(x).softmax(-1).max(-1).values.numpy()  # logits and a max_prob score
    return run


# Inverse of the converters' layout transforms (PyTorch -> Flax), for the PyTorch route.
_TO_TORCH = {mapping.identity: lambda x, shape: x, mapping.linear: lambda x, shape: x.T,
             mapping.conv: lambda x, shape: np.transpose(x, (x.ndim - 1, x.ndim - 2,
                                                             *range(x.ndim - 2))),
             mapping.pointwise_as_dense: lambda x, shape: x.T.reshape(shape)}


def torch_edge(model):
    """pytorchvideo's X3D holding `model`'s weights: the converter's rules run backwards."""
    import torch
    torch_model = pytorchvideo_create_x3d()(
        input_clip_length=CLIP[0], input_crop_size=CLIP[1], model_num_class=len(synthetic.CLASSES),
        dropout_rate=0.0, width_factor=demo.EDGE["width_factor"],
        depth_factor=demo.EDGE["depth_factor"], head_dim_out=demo.EDGE["head_dim"],
        head_activation=None).eval()
    template = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    weights = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.variables)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        key, transform = mapping._source(name, x3d_rules.RULES, template)
        weights[key] = torch.from_numpy(np.ascontiguousarray(
            _TO_TORCH[transform](np.asarray(leaf), template[key].shape)))
    torch_model.load_state_dict(weights, strict=False)  # num_batches_tracked: not weights
    return torch_model


def torch_route(model, path: str) -> tuple[Any, float]:
    """The edge exported through PyTorch (`torch.onnx`, NCDHW as PyTorch runs it): a
    function of uint8 clips -> logits in ONNX Runtime, and the export's seconds."""
    import torch
    torch_model = torch_edge(model)
    start = time.perf_counter()
    example = torch.zeros((BATCH, CLIP[-1], *CLIP[:-1]))
    torch.onnx.export(torch_model, (example,), path, dynamo=False, input_names=["x"],
                      output_names=["logits"])
    seconds = time.perf_counter() - start

    def prepare(clips):
        x = (clips.astype(np.float32) / 255 - 0.45) / 0.225
        return np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3)))
    return (lambda session: lambda clips: session.run(None, {"x": prepare(clips)})), seconds


def run(quick: bool) -> common.Section:
    try:
        import jax2onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise SystemExit(f"{err}: this benchmark needs `pip install jax2onnx onnxruntime` "
                         "(not dependencies of dmd_jax: jax2onnx pins orbax-checkpoint "
                         "below 0.11.37)") from err

    model = demo_or_random(EDGE_DIR, demo.EDGE, 0)
    trained = model.source != "random" and os.path.exists(POINT)
    if trained:
        router, _ = hybrid.load_router(POINT, SWITCHER_DIR, model.fingerprint)
    else:
        router = routers.load("max_prob", routers.Context())
    forward, names, leaves = edge_and_router(model, router)
    clips, labels = labelled_clips(BATCH * (4 if quick else 32))
    batches = [clips[i:i + BATCH] for i in range(0, len(clips), BATCH)]
    specs = [jax.ShapeDtypeStruct((BATCH, *CLIP), jnp.uint8)]
    specs += [jax.ShapeDtypeStruct(v.shape, jnp.float32) for v in leaves]
    start = time.perf_counter()
    proto = jax2onnx.to_onnx(forward, specs, input_names=["clips", *names],
                             output_names=["logits", "scores"])
    export_s = time.perf_counter() - start
    del proto.graph.value_info[:]  # jax2onnx's annotations are wrong here (see the docstring)
    folder = tempfile.mkdtemp()
    fp32, int8 = os.path.join(folder, "edge.onnx"), os.path.join(folder, "edge_int8.onnx")
    with open(fp32, "wb") as f:
        f.write(proto.SerializeToString())
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)

    jitted = jax.jit(forward)
    device_leaves = [jnp.asarray(v) for v in leaves]
    run_jax = lambda x: jax.block_until_ready(jitted(x, *device_leaves))  # noqa: E731
    feeds = lambda x: {"clips": x, **dict(zip(names, leaves))}  # noqa: E731
    reference = [np.concatenate(o) for o in zip(*(jax.device_get(run_jax(b)) for b in batches))]
    seconds = 1.0 if quick else 5.0
    rows, outputs = [], {}
    for variant, path in (("fp32", fp32), ("int8", int8)):
        for threads in (1, 2):
            session = onnx_session(path, threads)
            run_onnx = lambda x: session.run(None, feeds(x))  # noqa: E731
            outputs[variant] = [np.concatenate(o) for o in zip(*(run_onnx(b) for b in batches))]
            rows.append([f"ONNX Runtime {variant}", threads, rate(run_onnx, batches, seconds),
                         float(np.mean(outputs[variant][0].argmax(-1) == labels)),
                         float(np.abs(outputs[variant][0] - reference[0]).max())])
    torch_path = os.path.join(folder, "edge_from_torch.onnx")
    run_with, torch_export_s = torch_route(model, torch_path)
    for threads in (1, 2):
        run_onnx = run_with(onnx_session(torch_path, threads))
        logits = np.concatenate([run_onnx(b)[0] for b in batches])
        rows.append(["ONNX Runtime fp32, exported through PyTorch (edge only)", threads,
                     rate(run_onnx, batches, seconds),
                     float(np.mean(logits.argmax(-1) == labels)),
                     float(np.abs(logits - reference[0]).max())])
    jax_rate = rate(run_jax, batches, seconds)
    rows.append(["JAX (jit)", "all", jax_rate, float(np.mean(reference[0].argmax(-1) == labels)),
                 0.0])
    for threads in (1, 2):
        rows.append(["PyTorch eager (pytorchvideo)", threads,
                     rate(torch_forward(threads), batches, seconds), None, None])
    for row in rows:
        row.append(common.ratio(row[2], jax_rate))
    return common.Section(
        title="Edge export: ONNX Runtime vs JAX vs PyTorch on CPU",
        command="python -m benchmarks.edge_export",
        setup=(f"Edge: {EDGE_DIR if model.source != 'random' else 'random init'} (demo X3D, "
               f"width 0.5) with router {router.spec}; batches of {BATCH} clips (8x32x32), "
               f"{len(clips)} clean synthetic clips. jax2onnx {importlib.metadata.version('jax2onnx')} export "
               f"{export_s:.0f} s; int8: ONNX Runtime dynamic weight quantisation. Accuracy on "
               "those clips; the largest logit difference from JAX. 'Exported through "
               "PyTorch': the same weights put into pytorchvideo's X3D by the converter's "
               f"rules run backwards, `torch.onnx.export` ({torch_export_s:.1f} s), the edge "
               "alone (no router). PyTorch eager runs the same architecture with random "
               "weights (speed only) and its max_prob."),
        columns=["runtime", "threads", "clips/s", "accuracy", "max logit diff vs JAX",
                 "vs JAX"],
        rows=rows, devices=parallel.describe())


if __name__ == "__main__":
    common.main(run, __doc__)
