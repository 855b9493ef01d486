"""Compiling the label step with the weights as arguments vs closed over as constants.

The label job's step runs the edge and the cloud on a batch of clips. Written as
`jax.jit(lambda video: model.apply(variables, video))`, every weight is baked into the
program as a constant: the HLO grows by the model's size and XLA's constant folding
and layout passes run over it. dmd_jax passes the weights as arguments
(`jax.jit(lambda variables, video: ...)`). Both are lowered and compiled here, same
models, same batch, persistent cache off, and the outputs compared.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.demo_models import random_model
from benchmarks.hybrid_cost import KINETICS, VIDEOMAE_B, X3D_S
from dmd_jax import parallel
from dmd_jax.jobs import label

VIDEOMAE_S = {**VIDEOMAE_B, "hidden_size": 384, "num_heads": 6, "intermediate_size": 1536}


def measure(edge, cloud, clips: np.ndarray) -> tuple[list[list], dict[str, float]]:
    closed = jax.jit(lambda video: label.edge_and_cloud(edge, cloud, edge.variables,
                                                        cloud.variables, video))
    argument = jax.jit(lambda ev, cv, video: label.edge_and_cloud(edge, cloud, ev, cv, video))
    rows, outputs, compile_s = [], {}, {}
    for name, fn, args in (("weights as arguments (dmd_jax)", argument,
                            (edge.variables, cloud.variables, clips)),
                           ("weights closed over (constants)", closed, (clips,))):
        start = time.perf_counter()
        lowered = fn.lower(*args)
        hlo_mb = len(lowered.as_text()) / 1e6
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
        outputs[name] = compiled(*args)["cloud_logits"]
        compile_s[f"label step, {name}"] = seconds
        rows.append([name, hlo_mb, seconds])
    ours, theirs = outputs.values()
    error = float(jnp.max(jnp.abs(ours - theirs)))
    for row in rows:
        row.append(f"{error:.1e}")
    return rows, compile_s


def run(quick: bool) -> common.Section:
    device = parallel.describe()
    cloud_config, cloud_clip, name = ((VIDEOMAE_S, (8, 64, 64, 3), "VideoMAE-S 8x64x64")
                                      if quick else (VIDEOMAE_B, (16, 224, 224, 3),
                                                     "VideoMAE-B 16x224x224"))
    edge = random_model(X3D_S, KINETICS, (13, 160, 160, 3) if not quick else (4, 64, 64, 3), 0)
    cloud = random_model(cloud_config, KINETICS, cloud_clip, 1)
    params = sum(x.size for x in jax.tree.leaves(cloud.variables))
    clips = np.random.default_rng(0).integers(0, 256, (2, *cloud_clip), dtype=np.uint8)
    rows, compile_s = measure(edge, cloud, clips)
    rows = [[f"X3D-S + {name}", *row] for row in rows]
    ratio = rows[1][3] / rows[0][3]
    return common.Section(
        title="Label step compile: weights as arguments vs constants",
        command="python -m benchmarks.weights_as_arguments",
        setup=(f"The label job's step (edge and cloud forward passes, `label.edge_and_cloud`) on "
               f"a batch of 2 uint8 clips; edge X3D-S (random weights, resampling the clips to "
               f"its input), cloud {name} ({params / 1e6:.0f}M parameters, {params * 4 / 2**20:.0f}"
               f" MiB float32). Lowered and compiled once each way, persistent cache off; HLO "
               f"size is the StableHLO text of the lowered program. {device['device_count']} "
               f"{device['backend']} device(s)."),
        columns=["models", "weights", "HLO MB", "lower + compile s", "max |logit diff|"],
        rows=rows, compile_seconds=compile_s, devices=device,
        notes=[f"Compiling with the weights as constants took {ratio:.1f}x as long."])


if __name__ == "__main__":
    common.main(run, __doc__)
