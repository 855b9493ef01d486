"""X3D train step: dmd_jax (JAX/XLA) vs pytorchvideo's X3D (PyTorch), same config, one run.

    python -m benchmarks.x3d_train_step [--quick]

Both sides train the same architecture (pytorchvideo's `create_x3d` and
`dmd_jax.models.X3D` with equal widths/depths: their parameter counts are checked
equal) with SGD + momentum on the same random uint8 clips, float32. dmd_jax runs the
train job's own step (`train.train_step`, batch sharded over every device). On an
accelerator it adds bfloat16 rows with model FLOP utilisation (XLA's FLOP count of the
compiled step / step time / the chip's dense bf16 peak); PyTorch is timed only on the
CPU (the benchmark machines' torch wheel is CPU-only).
"""

from __future__ import annotations

import functools
import time

import jax
import ml_collections
import numpy as np

from benchmarks import common
from dmd_jax import flops, parallel
from dmd_jax.jobs import train
from dmd_jax.models.x3d import X3D
from dmd_jax.references import pytorchvideo_create_x3d

CASES = {
    # name: (model kwargs, batch, frames, crop)
    "demo edge 8x32x32": (dict(width_factor=0.5, depth_factor=1.0, head_dim=128), 32, 8, 32),
    "demo teacher 8x32x32": (dict(width_factor=2.0, depth_factor=1.0, head_dim=512), 32, 8, 32),
    "X3D-XS 4x160x160": (dict(width_factor=2.0, depth_factor=2.2, head_dim=2048), 8, 4, 160),
}
QUICK_CASES = ("demo edge 8x32x32",)
NUM_CLASSES = 12



def jax_step_rate(kwargs: dict, batch: int, frames: int, crop: int, steps: int, mesh,
                  dtype: str = "float32") -> dict:
    """clips/s, compile seconds, GFLOPs per step and parameter count of dmd_jax's step."""
    model = X3D(num_classes=NUM_CLASSES, dropout_rate=0.0, dtype=dtype, **kwargs)
    cfg = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.01, warmup_steps=0,
                                         schedule="cosine", steps=10**6, weight_decay=0.0,
                                         momentum=0.9))
    tx = train.make_optimizer(cfg)
    repl = parallel.replicated(mesh)
    state = jax.jit(functools.partial(train.init_state, model, tx, (frames, crop, crop, 3), 0),
                    out_shardings=repl)()
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, label_smoothing=0.0,
                                     seed=0), in_shardings=(repl, parallel.batch_sharded(mesh)),
                   out_shardings=(repl, repl), donate_argnums=0)
    rng = np.random.default_rng(0)
    data = parallel.to_global(
        {"video": rng.integers(0, 255, (batch, frames, crop, crop, 3), dtype=np.uint8),
         "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}, mesh)
    compiled, compile_s = common.timed_compile(step, state, data)
    gflops = flops.compiled_gflops(compiled) * mesh.size  # XLA counts one device's shard
    params = sum(np.size(x) for x in jax.tree.leaves(state.params))
    for _ in range(2):
        state, _ = compiled(state, data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = compiled(state, data)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / steps
    return {"clips_per_s": batch / seconds, "compile_s": compile_s, "gflops": gflops,
            "flops_per_s": gflops * 1e9 / seconds, "params": params}


def torch_step_rate(kwargs: dict, batch: int, frames: int, crop: int, steps: int) -> dict:
    import torch
    model = pytorchvideo_create_x3d()(
        input_clip_length=frames, input_crop_size=crop, model_num_class=NUM_CLASSES,
        dropout_rate=0.0, width_factor=kwargs["width_factor"],
        depth_factor=kwargs["depth_factor"], head_dim_out=kwargs["head_dim"],
        head_activation=None)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    video = torch.from_numpy(rng.integers(0, 255, (batch, frames, crop, crop, 3), dtype=np.uint8))
    label = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch))
    mean, std = torch.tensor(0.45), torch.tensor(0.225)

    def step():
        x = ((video.float() / 255.0 - mean) / std).permute(0, 4, 1, 2, 3)
        loss = torch.nn.functional.cross_entropy(model(x), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = common.seconds_per_call(step, steps, warmup=2)
    return {"clips_per_s": batch / seconds,
            "params": sum(p.numel() for p in model.parameters())}


def run(quick: bool) -> common.Section:
    mesh = parallel.make_mesh()
    device = parallel.describe()
    on_cpu = device["backend"] == "cpu"
    dtypes = ["float32"] if on_cpu else ["float32", "bfloat16"]
    steps = 3 if quick else 10
    rows, compile_seconds = [], {}
    for name in QUICK_CASES if quick else CASES:
        kwargs, batch, frames, crop = CASES[name]
        batch = max(batch, mesh.size) // mesh.size * mesh.size
        for dtype in dtypes:
            ours = jax_step_rate(kwargs, batch, frames, crop, steps, mesh, dtype)
            reference = torch_step_rate(kwargs, batch, frames, crop, steps) if (
                on_cpu and dtype == "float32") else None
            if reference:
                assert ours["params"] == reference["params"], (ours["params"], reference)
            ref_rate = reference["clips_per_s"] if reference else None
            rows.append([name, dtype, batch, ours["params"], ours["clips_per_s"], ref_rate,
                         common.ratio(ours["clips_per_s"], ref_rate), ours["gflops"] / batch,
                         common.mfu(ours["flops_per_s"], device["device_kind"], mesh.size)])
            compile_seconds[f"X3D train step, {name}, {dtype}"] = ours["compile_s"]
    torch_note = (f"torch {common.torch_threads()} threads" if on_cpu else
                  "PyTorch not timed on accelerators")
    return common.Section(
        title="X3D train step: dmd_jax vs pytorchvideo",
        command="python -m benchmarks.x3d_train_step",
        setup=(f"SGD + momentum, random uint8 clips, batch sharded over {mesh.size} "
               f"{device['backend']} device(s); {steps} timed steps after 2 warm-up steps; "
               f"{torch_note}. GFLOPs per clip are XLA's count for the whole step "
               "(forward + backward + update) divided by the batch."),
        columns=["case", "dtype", "batch", "params", "dmd_jax clips/s",
                 "pytorchvideo clips/s", "ratio", "step GFLOPs/clip", "MFU"],
        rows=rows, compile_seconds=compile_seconds, devices=device)


if __name__ == "__main__":
    common.main(run, __doc__)
