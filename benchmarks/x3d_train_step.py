"""X3D train step: dmd_jax (JAX/XLA) vs pytorchvideo's X3D (PyTorch), same config, one run.

    python benchmarks/x3d_train_step.py [--steps 20] [--threads 0]

Both sides train the same architecture (pytorchvideo's `create_x3d` and
`dmd_jax.models.X3D` with equal widths/depths: their parameter counts are checked
equal) with SGD + momentum on the same random uint8 clips, float32, batch and input
shape. Prints clips/s for both, the ratio, and dmd_jax's first-step compile time.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import ml_collections
import numpy as np

from dmd_jax.jobs import train
from dmd_jax.models.x3d import X3D
from dmd_jax.references import pytorchvideo_create_x3d

CASES = {
    # name: (model kwargs, batch, frames, crop)
    "demo edge 8x32x32": (dict(width_factor=0.5, depth_factor=1.0, head_dim=128), 32, 8, 32),
    "demo teacher 8x32x32": (dict(width_factor=1.5, depth_factor=1.0, head_dim=512), 32, 8, 32),
    "X3D-XS 4x160x160": (dict(width_factor=2.0, depth_factor=2.2, head_dim=2048), 8, 4, 160),
}
NUM_CLASSES = 12


def bench_jax(kwargs, batch, frames, crop, steps):
    model = X3D(num_classes=NUM_CLASSES, dropout_rate=0.0, **kwargs)
    cfg = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.01, warmup_steps=0,
                                         steps=10**6, weight_decay=0.0, momentum=0.9))
    tx = train.make_optimizer(cfg)
    state = train.init_state(model, tx, (frames, crop, crop, 3), 0)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, label_smoothing=0.0,
                                     seed=0), donate_argnums=0)
    rng = np.random.default_rng(0)
    data = {"video": rng.integers(0, 255, (batch, frames, crop, crop, 3), dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}
    data = jax.device_put(data)
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, m = step(state, data)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, data)
    jax.block_until_ready(state)
    params = sum(np.size(x) for x in jax.tree.leaves(state.params))
    return batch * steps / (time.perf_counter() - t0), compile_s, params


def bench_torch(kwargs, batch, frames, crop, steps):
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

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    params = sum(p.numel() for p in model.parameters())
    return batch * steps / (time.perf_counter() - t0), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    import torch
    print(f"# machine: {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} JAX {jax.default_backend()} device(s), "
          f"torch threads {torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}")
    print("| case | batch | params | dmd_jax clips/s | pytorchvideo clips/s | ratio | jax compile s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        kwargs, batch, frames, crop = CASES[name]
        jax_rate, compile_s, jax_params = bench_jax(kwargs, batch, frames, crop, args.steps)
        torch_rate, torch_params = bench_torch(kwargs, batch, frames, crop, args.steps)
        assert jax_params == torch_params, (jax_params, torch_params)
        print(f"| {name} | {batch} | {jax_params:,} | {jax_rate:.1f} | {torch_rate:.1f} | "
              f"{jax_rate / torch_rate:.2f}x | {compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
