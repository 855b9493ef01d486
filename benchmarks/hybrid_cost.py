"""Hybrid inference cost: GFLOPs and wall time per clip at several offload rates.

    python -m benchmarks.hybrid_cost [--quick]

The hybrid system spends `G_edge + G_switcher + r * G_cloud` per clip at offload rate
`r`. This measures each term on the exact jitted functions `dmd_jax.hybrid` runs (XLA's
cost analysis for GFLOPs, wall time per clip at a fixed batch) for two systems:

- demo: X3D width 0.5 edge + switcher, X3D width 2.0 cloud, 8x32x32 clips (the demo's
  trained models when `runs/demo` has them, else random weights: cost does not depend
  on the weights). The whole `HybridClassifier` is also run at each offload rate (the
  threshold set to that quantile of the switcher's scores), so the wall time there
  includes the host-side routing, the gather of offloaded clips and the fusion.
- paper scale (skipped with `--quick`): X3D-S edge (13x160x160) + switcher, VideoMAE-B
  cloud (16x224x224), random weights; its hybrid rows add the measured terms (the two
  models take different clip shapes, so one batch cannot go through both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.demo_models import CLOUD_DIR, EDGE_DIR, demo_or_random, random_model
from configs import demo
from dmd_jax import hybrid, parallel, routers
from dmd_jax.model_store import LoadedModel
from dmd_jax.routers.switcher import Switcher, probability

KINETICS = tuple(f"class {i}" for i in range(400))  # stand-in names: cost only
RATES = (0.0, 0.125, 0.25, 0.5, 1.0)
X3D_S = dict(name="x3d", width_factor=2.0, depth_factor=2.2, stem_dim_in=12,
             bottleneck_factor=2.25, se_ratio=0.0625, head_dim=2048, dropout_rate=0.5)
VIDEOMAE_B = dict(name="videomae", patch_size=16, tubelet_size=2, hidden_size=768, num_layers=12,
                  num_heads=12, intermediate_size=3072, qv_bias=True, use_mean_pooling=True,
                  layer_norm_eps=1e-12)


def with_switcher(edge: LoadedModel, cloud: hybrid.CloudFn, cloud_gflops: float,
                  seed: int) -> hybrid.HybridClassifier:
    """A HybridClassifier around `edge` with a randomly initialised switcher."""
    switcher = Switcher()
    _, features = jax.eval_shape(edge.apply, edge.variables,
                                 jnp.zeros((1, *edge.input_shape), jnp.uint8))
    params = switcher.init(jax.random.key(seed), jnp.zeros(features.shape),
                           jnp.zeros((1, len(edge.class_names))))["params"]
    router = routers.Router("switcher:random", lambda p, f, l: probability(switcher, p, f, l),
                            params, learned=True)
    return hybrid.HybridClassifier(edge, router, threshold=0.0, cloud=cloud,
                                   cloud_gflops_per_clip=cloud_gflops)


def threshold_for(scores: np.ndarray, rate: float) -> float:
    """A threshold that offloads the `rate` fraction of lowest-scoring clips."""
    ordered = np.sort(scores.astype(np.float64))
    k = int(round(rate * len(ordered)))
    if k == 0:
        return -np.inf
    return np.inf if k == len(ordered) else float(ordered[k - 1] + ordered[k]) / 2


def ms_per_clip(fn, clips: np.ndarray, iters: int) -> float:
    return 1e3 * common.seconds_per_call(lambda: jax.block_until_ready(fn(clips)), iters) / len(
        clips)


def measure_system(name: str, edge: LoadedModel, cloud: LoadedModel, batch: int, iters: int,
                   run_hybrid: bool) -> tuple[list[list], dict[str, float]]:
    rng = np.random.default_rng(0)
    edge_clips = rng.integers(0, 255, (batch, *edge.input_shape), dtype=np.uint8)
    cloud_clips = rng.integers(0, 255, (batch, *cloud.input_shape), dtype=np.uint8)
    cloud_g = hybrid.cloud_gflops(cloud)  # one clip, lowered on shapes
    forward = jax.jit(hybrid.cloud_forward(cloud))
    cloud_forward = lambda clips: forward(cloud.variables, clips)  # noqa: E731
    system = with_switcher(edge, lambda clips: np.asarray(cloud_forward(clips)), cloud_g, seed=0)
    _, edge_compile = common.timed_compile(system.edge_and_router, edge_clips)
    _, cloud_compile = common.timed_compile(cloud_forward, cloud_clips)
    edge_g = system.edge_gflops_per_clip
    edge_ms = ms_per_clip(system.edge_and_router, edge_clips, iters)
    cloud_ms = ms_per_clip(cloud_forward, cloud_clips, iters)
    scores = np.asarray(system.edge_and_router(edge_clips)[1])
    rows = []
    for nominal in RATES:
        # Run for real: a whole number of the batch's clips. Summed: the nominal rate.
        rate = round(nominal * batch) / batch if run_hybrid else nominal
        gflops = edge_g + rate * cloud_g
        measured_ms = None
        if run_hybrid:
            system.threshold = threshold_for(scores, rate)
            assert system(edge_clips).offloaded.mean() == rate
            measured_ms = ms_per_clip(system, edge_clips, iters)
        rows.append([name, f"{rate:.1%}", gflops, f"{gflops / cloud_g:.1%}",
                     edge_ms + rate * cloud_ms, measured_ms])
    compile_s = {f"hybrid {name}: edge + switcher": edge_compile,
                 f"hybrid {name}: cloud forward": cloud_compile}
    return rows, compile_s


def run(quick: bool) -> common.Section:
    device = parallel.describe()
    iters = 2 if quick else 20  # ~64 ms a call: many, or this shared VM's noise dominates
    edge = demo_or_random(EDGE_DIR, demo.EDGE, 0)
    cloud = demo_or_random(CLOUD_DIR, demo.TEACHER, 1)
    weights = "random weights" if edge.source == "random" else "trained"
    rows, compile_s = measure_system(f"demo ({weights})", edge, cloud, 64, iters, True)
    if not quick:
        edge = random_model(X3D_S, KINETICS, (13, 160, 160, 3), 2)
        cloud = random_model(VIDEOMAE_B, KINETICS, (16, 224, 224, 3), 3)
        more_rows, more_compile = measure_system("X3D-S + VideoMAE-B", edge, cloud, 4, 2, False)
        rows += more_rows
        compile_s.update(more_compile)
    return common.Section(
        title="Hybrid inference cost per clip",
        command="python -m benchmarks.hybrid_cost",
        setup=("GFLOPs from XLA's cost analysis of the compiled edge + switcher and cloud "
               "functions; wall time per clip at batch 64 (demo) or 4 (paper scale) on one "
               f"{device['backend']} device. 'sum' = edge + switcher time + rate x cloud time; "
               "'measured' = the whole HybridClassifier at that offload rate (demo only)."),
        columns=["system", "offload", "GFLOPs/clip", "of cloud GFLOPs", "sum ms/clip",
                 "measured ms/clip"],
        rows=rows, compile_seconds=compile_s, devices=device)


if __name__ == "__main__":
    common.main(run, __doc__)
