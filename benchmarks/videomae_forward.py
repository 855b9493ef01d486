"""VideoMAE forward: dmd_jax (converted weights) vs transformers on PyTorch, one run.

    python benchmarks/videomae_forward.py [--size b] [--batch 4] [--frames 16] [--image 224]
                                          [--iters 3] [--dtype float32|bfloat16]

Builds a random-weight `VideoMAEForVideoClassification` (ViT-S/B/L), converts it with
`dmd_jax.convert`, checks the two agree, then times the forward of the same batch in
both and prints clips/s and the ratio. With `--dtype bfloat16` (for accelerators) it
also reports model FLOP utilisation: XLA's FLOP count of the compiled forward / time /
the chip's peak (`--peak-tflops`, known for H100/H200).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np

from dmd_jax import convert, flops, models
from dmd_jax.models import videomae

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per chip


def _reference(size: str, frames: int, image: int):
    import transformers

    v = videomae.VARIANTS[size]
    config = transformers.VideoMAEConfig(
        image_size=image, num_frames=frames, hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"], num_labels=400)
    return transformers.VideoMAEForVideoClassification(config).eval()


def _time(fn, iters: int) -> float:
    fn()  # warm-up (compilation for JAX)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="b", choices=sorted(videomae.VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    import torch

    reference = _reference(args.size, args.frames, args.image)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        model = convert.convert("videomae", tmp, os.path.join(tmp, "flax"))
    config = model.model_config
    config.dtype = args.dtype  # compute dtype; the parameters stay float32
    module = models.build(config, len(model.class_names))
    x = np.random.default_rng(0).normal(
        size=(args.batch, args.frames, args.image, args.image, 3)).astype(np.float32)
    forward = jax.jit(lambda v, clip: module.apply(v, clip)[0])
    variables, clip = jax.device_put(model.variables), jax.device_put(x)

    torch_x = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 1, 4, 2, 3))))
    with torch.inference_mode():
        expected = reference(pixel_values=torch_x).logits.numpy()
    error = float(np.max(np.abs(np.asarray(forward(variables, clip)) - expected)))

    jax_s = _time(lambda: forward(variables, clip).block_until_ready(), args.iters)
    gflops = flops.gflops(lambda v, c: module.apply(v, c)[0], variables, clip)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}")
    print(f"VideoMAE-{args.size.upper()} forward, batch {args.batch}, "
          f"{args.frames}x{args.image}x{args.image}, {args.dtype}; max |dlogits| vs "
          f"transformers (float32) {error:.2e}; XLA counts {gflops / args.batch:.1f} GFLOPs/clip")
    print(f"dmd_jax:      {args.batch / jax_s:8.3f} clips/s")
    if not args.skip_torch:
        with torch.inference_mode():
            torch_s = _time(lambda: reference(pixel_values=torch_x), args.iters)
        print(f"transformers: {args.batch / torch_s:8.3f} clips/s  (torch threads "
              f"{torch.get_num_threads()})")
        print(f"ratio dmd_jax / transformers: {torch_s / jax_s:.2f}x")
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), 0.0)
    if peak:
        print(f"MFU: {gflops / jax_s / 1e3 / peak:.1%} of {peak:.0f} TFLOP/s ({kind})")


if __name__ == "__main__":
    main()
