"""Adaptation throughput: stream clips/s of source, tent, cema and cloud_all (dmd_jax),
with source and tent also run by PyTorch on pytorchvideo's X3D in the same process.

    python -m benchmarks.adapt_throughput [--quick]

The models are the demo's (`runs/demo/{edge,teacher}/model`, after `make demo`); where
those are missing, randomly initialised models of the demo's architectures (then
CEMA's edge is too unsure to upload anything and runs at the speed of its forward pass:
the upload column says so). The stream is the demo's test split under gaussian_noise
severity 5, corrupted once up front so that only the method is timed. Each method runs
the stream once to compile every shape, is reset, and is timed over the whole stream
again, cloud steps and host-side filtering included.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.demo_models import CLOUD_DIR, DEMO_CLIP as CLIP, EDGE_DIR, demo_or_random
from configs import demo
from dmd_jax import parallel, tta
from dmd_jax.data import corruptions, synthetic
from dmd_jax.references import pytorchvideo_create_x3d
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import Context



def corrupted_stream(batches: int, batch: int, mesh) -> list[jax.Array]:
    """Synthetic clips under gaussian_noise@5, on the mesh."""
    render = synthetic.RenderConfig(frames=CLIP[0], height=CLIP[1], width=CLIP[2])
    rng = np.random.default_rng(0)
    clips = np.stack([synthetic.render_clip(rng, int(rng.integers(len(synthetic.CLASSES))),
                                            render)[0] for _ in range(batches * batch)])
    ids = jnp.arange(len(clips))
    clips = corruptions.corrupt_clips(jnp.asarray(clips), ids, "gaussian_noise", 5, seed=0)
    return [parallel.to_global(np.asarray(clips[i:i + batch]), mesh)
            for i in range(0, len(clips), batch)]


def time_stream(method, stream) -> tuple[float, float]:
    """(clips/s, upload fraction) over the stream, after a first pass that compiles."""
    for clips in stream:
        method.process(clips)
    method.reset()
    uploaded, start = 0, time.perf_counter()
    for clips in stream:
        uploaded += int(method.process(clips).uploaded.sum())
    clips_total = sum(c.shape[0] for c in stream)
    return clips_total / (time.perf_counter() - start), uploaded / clips_total


def torch_rates(arch: dict, stream: list[np.ndarray], lr: float) -> dict[str, float]:
    """PyTorch references: source (eval forward) and Tent (BN from the batch, entropy,
    backward, SGD momentum on the BN affine parameters), the official algorithm."""
    import torch
    model = pytorchvideo_create_x3d()(
        input_clip_length=CLIP[0], input_crop_size=CLIP[1], model_num_class=len(synthetic.CLASSES),
        dropout_rate=0.0, width_factor=arch["width_factor"], depth_factor=arch["depth_factor"],
        head_dim_out=arch["head_dim"], head_activation=None)
    mean, std = torch.tensor(0.45), torch.tensor(0.225)
    inputs = [((torch.from_numpy(np.array(c)).float() / 255 - mean) / std).permute(0, 4, 1, 2, 3)
              for c in stream]
    rates = {}

    model.eval()
    with torch.no_grad():
        model(inputs[0])
        start = time.perf_counter()
        for x in inputs:
            model(x).argmax(-1)
    rates["source"] = sum(len(x) for x in inputs) / (time.perf_counter() - start)

    model.train()  # BatchNorm from the batch; dropout is 0
    affine = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)
              for p in (m.weight, m.bias)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    opt = torch.optim.SGD(affine, lr=lr, momentum=0.9)

    def tent_step(x):
        logits = model(x)
        loss = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return logits.argmax(-1)

    tent_step(inputs[0])
    start = time.perf_counter()
    for x in inputs:
        tent_step(x)
    rates["tent"] = sum(len(x) for x in inputs) / (time.perf_counter() - start)
    return rates


def run(quick: bool) -> common.Section:
    config = demo.get_config("adapt").adapt
    mesh = parallel.make_mesh()
    device = parallel.describe()
    batches = 4 if quick else 16
    edge_model = demo_or_random(EDGE_DIR, demo.EDGE, 0)
    cloud_model = demo_or_random(CLOUD_DIR, demo.TEACHER, 1)
    edge_from = EDGE_DIR if edge_model.source != "random" else "random init"
    cloud_from = CLOUD_DIR if cloud_model.source != "random" else "random init"
    edge, cloud = Adaptable.of(edge_model), Adaptable.of(cloud_model)
    stream = corrupted_stream(batches, config.batch_size, mesh)
    reference = (torch_rates(demo.EDGE, [jax.device_get(c) for c in stream],
                             config.tent.learning_rate) if device["backend"] == "cpu" else {})
    context = lambda name: Context(name, mesh, config.seed, config.batch_size,  # noqa: E731
                                   foundation=lambda: cloud, clean_batches=None)
    methods = {name: tta.build(config, name, edge, context(name))
               for name in ("source", "tent", "cema", "cloud_all")}
    rows = []
    for name, method in methods.items():
        rate, upload = time_stream(method, stream)
        ref = reference.get(name)
        rows.append([name, rate, f"{upload:.1%}", ref, common.ratio(rate, ref)])
    torch_note = (f"PyTorch ({common.torch_threads()} threads) runs the same edge architecture "
                  "(pytorchvideo `create_x3d`): `source` as an eval-mode forward, `tent` as the "
                  "official algorithm" if reference else "PyTorch not timed on accelerators")
    return common.Section(
        title="Online adaptation throughput",
        command="python -m benchmarks.adapt_throughput",
        setup=(f"Edge: {edge_from}; cloud: {cloud_from} (demo architectures: X3D width 0.5 and "
               f"2.0). {batches} stream batches of {config.batch_size} clips (8x32x32) under "
               "gaussian_noise severity 5, corrupted up front so that only the method is timed; "
               "each method runs the stream once to compile, is reset, and is timed over it "
               f"again (cloud steps and host-side filtering included). {torch_note}. "
               f"{mesh.size} {device['backend']} device(s)."),
        columns=["method", "dmd_jax stream clips/s", "upload", "PyTorch clips/s", "ratio"],
        rows=rows, devices=device)


if __name__ == "__main__":
    common.main(run, __doc__)
