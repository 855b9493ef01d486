"""VideoMAE forward: dmd_jax (converted weights) vs transformers on PyTorch, one run.

    python -m benchmarks.videomae_forward [--quick]

Builds a random-weight `VideoMAEForVideoClassification` (ViT-B, 16x224x224; ViT-S at
8x64x64 with `--quick`), converts it with `dmd_jax.convert`, checks the two agree, then
times the forward of the same batch in both. On an accelerator it adds a bfloat16 row
with model FLOP utilisation (XLA's FLOP count / time / the chip's dense bf16 peak);
PyTorch is timed only on the CPU (the benchmark machines' torch wheel is CPU-only).
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from benchmarks import common
from dmd_jax import convert, flops, models, parallel
from dmd_jax.models import videomae

FULL = dict(size="b", batch=4, frames=16, image=224, iters=2)
QUICK = dict(size="s", batch=2, frames=8, image=64, iters=2)


def reference_model(size: str, frames: int, image: int):
    import transformers

    v = videomae.VARIANTS[size]
    config = transformers.VideoMAEConfig(
        image_size=image, num_frames=frames, hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"], num_labels=400)
    return transformers.VideoMAEForVideoClassification(config).eval()


def run(quick: bool) -> common.Section:
    import torch

    case = QUICK if quick else FULL
    device = parallel.describe()
    on_cpu = device["backend"] == "cpu"
    reference = reference_model(case["size"], case["frames"], case["image"])
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        converted = convert.convert("videomae", tmp, os.path.join(tmp, "flax"))
    x = np.random.default_rng(0).normal(
        size=(case["batch"], case["frames"], case["image"], case["image"], 3)).astype(np.float32)
    torch_x = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 1, 4, 2, 3))))
    with torch.inference_mode():
        expected = reference(pixel_values=torch_x).logits.numpy()
        torch_rate = (case["batch"] / common.seconds_per_call(
            lambda: reference(pixel_values=torch_x), case["iters"]) if on_cpu else None)

    name = f"VideoMAE-{case['size'].upper()} {case['frames']}x{case['image']}x{case['image']}"
    rows, compile_seconds, errors = [], {}, {}
    for dtype in ["float32"] if on_cpu else ["float32", "bfloat16"]:
        # The compute dtype is a runtime setting; the parameters stay float32.
        module = models.build(converted.model_config, len(converted.class_names),
                              {"dtype": dtype})
        apply = lambda v, clip: module.apply(v, clip)[0]  # noqa: E731
        variables, clip = jax.device_put(converted.variables), jax.device_put(x)
        forward, compile_s = common.timed_compile(jax.jit(apply), variables, clip)
        errors[dtype] = float(np.max(np.abs(np.asarray(forward(variables, clip)) - expected)))
        seconds = common.seconds_per_call(
            lambda: forward(variables, clip).block_until_ready(), case["iters"])
        gflops = flops.compiled_gflops(forward)
        rate = case["batch"] / seconds
        reference_rate = torch_rate if dtype == "float32" else None
        rows.append([name, dtype, case["batch"], rate, reference_rate,
                     common.ratio(rate, reference_rate), gflops / case["batch"],
                     f"{errors[dtype]:.1e}", common.mfu(gflops * 1e9 / seconds,
                                                        device["device_kind"])])
        compile_seconds[f"VideoMAE forward, {name}, {dtype}"] = compile_s
    return common.Section(
        title="VideoMAE forward: dmd_jax vs transformers",
        command="python -m benchmarks.videomae_forward",
        setup=(f"Random-weight transformers model converted with `dmd_jax.convert`; the same "
               f"batch through both, {case['iters']} timed iterations after one warm-up, one "
               f"{device['backend']} device. max |Δlogits| is against transformers in float32."),
        columns=["model", "dtype", "batch", "dmd_jax clips/s", "transformers clips/s", "ratio",
                 "GFLOPs/clip", "max abs dlogits", "MFU"],
        rows=rows, compile_seconds=compile_seconds, devices=device)


if __name__ == "__main__":
    common.main(run, __doc__)
