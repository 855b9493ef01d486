"""Data-parallel scaling of the X3D train step over 1/2/4/8 CPU devices.

    python -m benchmarks.scaling [--quick]

Each device count runs in its own process (XLA's host device count is fixed when JAX
starts): the demo edge's train step, as the train job builds it, at a fixed global
batch of 64 sharded over the `data` mesh. What it shows on a CPU host is the cost of
the sharded program and its gradient all-reduce when the devices share the same cores;
on a TPU slice or multi-GPU host the same code splits real work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks import common

DEVICE_COUNTS = (1, 2, 4, 8)
GLOBAL_BATCH = 64


def child(devices: int, steps: int, out: str) -> None:
    """Runs in a fresh process with `devices` fake CPU devices."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from benchmarks import x3d_train_step
    from dmd_jax import parallel

    mesh = parallel.make_mesh()
    assert mesh.size == devices, (mesh.size, devices)
    kwargs, _, frames, crop = x3d_train_step.CASES["demo edge 8x32x32"]
    result = x3d_train_step.jax_step_rate(kwargs, GLOBAL_BATCH, frames, crop, steps, mesh)
    with open(out, "w") as f:
        json.dump(result, f)


def run(quick: bool) -> common.Section:
    steps = 3 if quick else 10
    counts = DEVICE_COUNTS[:2] if quick else DEVICE_COUNTS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = os.path.join(tmp, f"{n}.json")
            subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--devices", str(n),
                            "--steps", str(steps), "--out", out], check=True)
            with open(out) as f:
                results[n] = json.load(f)
    base = results[1]["clips_per_s"]
    rows = [[n, r["clips_per_s"], f"{r['clips_per_s'] / base:.2f}x",
             f"{r['clips_per_s'] / base / n:.0%}", r["compile_s"]] for n, r in results.items()]
    return common.Section(
        title="Train step scaling over CPU devices",
        command="python -m benchmarks.scaling",
        setup=(f"Demo edge (X3D width 0.5, 8x32x32), global batch {GLOBAL_BATCH} sharded over "
               f"N fake CPU devices (`--xla_force_host_platform_device_count`) on "
               f"{os.cpu_count()} cores, one process per N; {steps} timed steps after 2 warm-up."),
        columns=["devices", "clips/s", "speed-up vs 1", "efficiency", "compile s"],
        rows=rows, compile_seconds={f"X3D train step, {n} CPU devices": r["compile_s"]
                                    for n, r in results.items()},
        devices={"backend": "cpu", "device_kind": "cpu", "device_count": max(counts),
                 "process_count": 1})


def main() -> None:
    if "--devices" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--devices", type=int, required=True)
        parser.add_argument("--steps", type=int, required=True)
        parser.add_argument("--out", required=True)
        args = parser.parse_args()
        child(args.devices, args.steps, args.out)
    else:
        common.main(run, __doc__)


if __name__ == "__main__":
    main()
