"""Compute accounting: FLOPs per clip as XLA counts them for the compiled function.

The hybrid system's cost is `G_edge + G_switcher + r * G_cloud` per clip. We take each
`G` from XLA's cost analysis of the exact function that runs (the same jit, the same
input shape) rather than from a hand-written formula that drifts from the code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def gflops(fn: Callable[..., Any], *example_args: Any) -> float:
    """GFLOPs of one call of `jax.jit(fn)` on `example_args`, from XLA's cost analysis.

    Pass weights as arguments, as `jax.ShapeDtypeStruct`s (`abstract`): the function is
    lowered on shapes alone, so no weight is copied or compiled in as a constant."""
    return compiled_gflops(jax.jit(fn).lower(*example_args).compile())


def abstract(tree: Any) -> Any:
    """The shapes and dtypes of a pytree of arrays, for `gflops`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), x.dtype), tree)


def compiled_gflops(compiled: jax.stages.Compiled) -> float:
    """GFLOPs of one call of an already compiled function (no second compilation)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    flops = (analysis or {}).get("flops")
    if flops is None or flops < 0:
        raise RuntimeError(f"XLA's cost analysis on {jax.default_backend()} reported no FLOP "
                           "count for this function")
    return float(flops) / 1e9
