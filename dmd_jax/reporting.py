"""What a job tells the world: progress lines, TensorBoard scalars, fingerprints.

Only the main process prints and writes (other hosts would duplicate every line and
file); files go through `dmd_jax.files`.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import parameter_overview

from dmd_jax import files, parallel


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on TPU VMs or in CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fingerprint(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes: equal iff bit-identical."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(parallel.fetch(tree))[0]:
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


def parameter_summary(params: Any, workdir: str) -> str:
    """Writes the full per-tensor table to parameters.txt; returns a per-module digest."""
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    files.write_text(os.path.join(workdir, "parameters.txt"), table + "\n")
    counts: dict[str, int] = {}
    for key, leaf in params.items():
        counts[key.split("_block")[0]] = counts.get(key.split("_block")[0], 0) + sum(
            np.size(x) for x in jax.tree.leaves(leaf))
    total = sum(counts.values())
    rows = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    return f"{total:,} parameters ({rows}); per-tensor table in parameters.txt"


class MetricWriter:
    """TensorBoard event files in the workdir (tensorboardX: no TensorFlow needed)."""

    def __init__(self, workdir: str):
        self._writer = None
        if parallel.is_main_process():
            from tensorboardX import SummaryWriter  # imported lazily: heavy-ish
            self._writer = SummaryWriter(logdir=workdir, flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer:
            for key, value in values.items():
                self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._writer:
            self._writer.close()


class Progress:
    """Steps/s, examples/s and ETA over the steps since the last report."""

    def __init__(self, total_steps: int, start_step: int, examples_per_step: int):
        self.total, self.examples_per_step = total_steps, examples_per_step
        self._last_step, self._last_time = start_step, time.perf_counter()
        self.measured_steps, self.measured_seconds = 0, 0.0

    def restart_clock(self, step: int) -> None:
        """Call after compilation so that compile time does not count as throughput."""
        self._last_step, self._last_time = step, time.perf_counter()

    def line(self, step: int, metrics: Mapping[str, float], tag: str = "train") -> str:
        now = time.perf_counter()
        steps, seconds = step - self._last_step, max(now - self._last_time, 1e-9)
        self.measured_steps += steps
        self.measured_seconds += seconds
        self._last_step, self._last_time = step, now
        rate = steps / seconds
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return (f"[{tag}] step {step}/{self.total}  {values}  {rate:.2f} steps/s  "
                f"{rate * self.examples_per_step:.0f} clips/s  ETA {_duration(eta)}")

    @property
    def examples_per_sec(self) -> float:
        if not self.measured_seconds:
            return 0.0
        return self.measured_steps * self.examples_per_step / self.measured_seconds


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def log(message: str) -> None:
    if parallel.is_main_process():
        print(message, flush=True)


def devices_sentence(devices: Mapping[str, Any] | None) -> str:
    """`parallel.describe()` as a report's sentence: 'Ran on 8 TPU v5 lite devices
    (backend tpu) in 2 processes.'"""
    if not devices:
        return "The devices it ran on were not recorded."
    count, processes = devices["device_count"], devices["process_count"]
    return (f"Ran on {count} {devices['device_kind']} device{'s' if count != 1 else ''} "
            f"(backend {devices['backend']}) in {processes} "
            f"process{'es' if processes != 1 else ''}.")
