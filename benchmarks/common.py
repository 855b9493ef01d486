"""What every benchmark shares: its result (`Section`), the machine it ran on, timing.

A benchmark module defines `run(quick: bool) -> Section` and ends with
`common.main(run, __doc__)`, which runs it standalone (printing its markdown) or, under
`benchmarks/suite.py`, writes the section as JSON for the suite to assemble.
Importing this module does not initialise JAX: `benchmarks/scaling.py` must choose the
device count first.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import time
from typing import Any, Callable

# Dense bf16 peak per chip, TFLOP/s (vendor datasheets), matched against
# `device.device_kind` in this order (first match wins: "TPU v5 lite" before "TPU v5").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("TPU v6 lite", 918.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v4", 275.0),
)


@dataclasses.dataclass
class Section:
    """One benchmark's results: a table plus what a reader needs to interpret it."""

    title: str
    command: str  # how to run this benchmark alone
    setup: str  # what was measured, how, on which models
    columns: list[str]
    rows: list[list[Any]]
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # computed remarks, not opinions
    devices: dict[str, Any] = dataclasses.field(default_factory=dict)  # parallel.describe()
    machine: dict[str, Any] = dataclasses.field(default_factory=dict)  # `machine()`, set by main

    def markdown_table(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def ratio(ours: float, reference: float | None) -> str:
    """`ours / reference` as '0.44x' (throughputs: above 1 means dmd_jax is faster)."""
    return f"{ours / reference:.2f}x" if reference else "-"


def peak_bf16_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def mfu(flops_per_second: float, device_kind: str, chips: int = 1) -> str:
    """Model FLOP utilisation against the chips' dense bf16 peak ('-' where unknown)."""
    peak = peak_bf16_tflops(device_kind)
    return f"{flops_per_second / 1e12 / (peak * chips):.1%}" if peak else "-"


def seconds_per_call(fn: Callable[[], Any], iters: int, warmup: int = 1) -> float:
    """Mean wall seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def timed_compile(jitted, *args) -> tuple[Any, float]:
    """`(compiled executable, seconds to lower and compile)`: compile time on its own,
    not mixed into the first step (the suite runs with the persistent cache off)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def machine() -> dict[str, Any]:
    """The host, for the report header: CPU, cores, memory, package versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "pytorchvideo"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
            "python": platform.python_version(), "versions": versions,
            "date": datetime.date.today().isoformat()}


def main(run: Callable[[bool], Section], doc: str | None) -> None:
    """Command line of a benchmark module: `[--quick] [--json PATH]`."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few iterations: checks that it runs, not speed")
    parser.add_argument("--json", help="write the section here (used by benchmarks/suite.py)")
    args = parser.parse_args()
    section = run(args.quick)
    section.machine = machine()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(section), f)
    else:
        print(f"## {section.title}\n\n{section.setup}\n\n{section.markdown_table()}")
        for note in section.notes:
            print(f"\n{note}")
        for what, seconds in section.compile_seconds.items():
            print(f"compile {what}: {seconds:.1f} s")
