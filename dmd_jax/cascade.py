"""Cascades of more than two models: edge -> middle -> ... -> cloud, one router per hop.

A clip starts at tier 0. At hop `k` the router of tier `k` scores what tier `k` computed
for the clip; a score below the hop's threshold `tau_k` sends the clip on to tier `k + 1`,
any other stops it there with tier `k`'s answer. The last tier answers whatever reaches it.
So a clip's answer is correct with

    c_0 + sum_{k >= 1} d_0 ... d_{k-1} (c_k - c_{k-1})

(`c_k`: tier k is right, `d_k`: hop k defers) and it costs

    C_0 + sum_{k >= 1} d_0 ... d_{k-1} C_k

GFLOPs (`C_k`: tier k's model plus, below the last tier, its router). Thresholds are
chosen on a calibration split as quantiles of each hop's scores (`routing.
threshold_for_rate`, a grid of offload rates per hop) and then held fixed: every grid
point is one deployable cascade, realised on test. A threshold is a strict `<`, so tied
scores move together (no expectation over ties, unlike `routing.deferral_curve`).

The set of cascades is summarised on the cost-accuracy plane by its *non-decreasing
convex hull* (every point on it is reachable by alternating, clip by clip at random,
between the two grid points at its ends, and spending more is never forced to lose
accuracy) and by RouterBench's AIQ (Hu et al. 2024), the hull's mean height over a cost
range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from dmd_jax import routing
from dmd_jax.errors import UserError

MAX_GRID_CELLS = 20_000_000  # grid points x clips held at once


@dataclasses.dataclass(frozen=True)
class Grid:
    """Every cascade of a threshold grid on one split: arrays of shape `(G_0, ..., G_{K-2})`
    (one axis per hop, indexed by the hop's offload-rate index)."""

    rates: tuple[np.ndarray, ...]  # per hop: the calibration offload rates of the thresholds
    thresholds: tuple[np.ndarray, ...]  # per hop: tau_k (score < tau_k defers)
    accuracy: np.ndarray
    gflops: np.ndarray  # per clip
    reach: np.ndarray  # (..., K): the fraction of clips each tier runs on


def hop_thresholds(scores: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Thresholds deferring each fraction in `rates` of these (calibration) scores."""
    return np.asarray([routing.threshold_for_rate(scores, r) for r in rates], np.float64)


def evaluate(correct: Sequence[np.ndarray], scores: Sequence[np.ndarray],
             thresholds: Sequence[np.ndarray], costs: Sequence[float],
             rates: Sequence[np.ndarray] | None = None) -> Grid:
    """Accuracy, GFLOPs per clip and each tier's reach for every combination of the hops'
    thresholds. `correct[k]` (N,): tier k's answer is right; `scores[k]` (N,): hop k's router
    scores (K - 1 of them); `costs[k]`: GFLOPs per clip tier k spends on a clip reaching it
    (model and router)."""
    tiers = len(correct)
    if tiers < 2 or len(scores) != tiers - 1 or len(thresholds) != tiers - 1 \
            or len(costs) != tiers:
        raise ValueError(f"a cascade of {len(correct)} tiers needs {len(correct) - 1} hops' "
                         f"scores and thresholds and {len(correct)} costs; got {len(scores)}, "
                         f"{len(thresholds)} and {len(costs)}")
    n = len(correct[0])
    shape = tuple(len(t) for t in thresholds)
    if math.prod(shape) * n > MAX_GRID_CELLS:
        raise UserError(f"a grid of {shape} thresholds over {n} clips is too large to hold "
                        f"({math.prod(shape) * n:,} cells > {MAX_GRID_CELLS:,}): use fewer rates "
                        "per hop")
    correct = [np.asarray(c, np.float64) for c in correct]
    accuracy = np.full(shape, correct[0].mean())
    gflops = np.full(shape, float(costs[0]))
    reach = np.zeros(shape + (tiers,))
    reach[..., 0] = 1.0
    reached = np.ones((1,) * len(shape) + (n,), bool)  # d_0 ... d_{k-1}, broadcast over hops
    for k in range(1, tiers):
        defer = np.asarray(scores[k - 1])[None, :] < np.asarray(thresholds[k - 1])[:, None]
        axis_shape = [1] * len(shape) + [n]
        axis_shape[k - 1] = shape[k - 1]
        reached = reached & defer.reshape(axis_shape)
        fraction = reached.mean(-1)
        accuracy = accuracy + (reached @ (correct[k] - correct[k - 1])) / n
        gflops = gflops + fraction * float(costs[k])
        reach[..., k] = fraction
    if rates is None:
        rates = [np.full(len(t), np.nan) for t in thresholds]
    return Grid(tuple(np.asarray(r) for r in rates),
                tuple(np.asarray(t) for t in thresholds),
                np.broadcast_to(accuracy, shape).copy(),
                np.broadcast_to(gflops, shape).copy(),
                np.broadcast_to(reach, shape + (tiers,)).copy())


def non_decreasing_hull(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """The non-decreasing convex hull of points `(cost, accuracy)`, as `(M, 2)` vertices
    by increasing cost: the upper concave envelope from the cheapest point (its best
    accuracy) to the most accurate one (its cheapest), flat beyond."""
    points = np.stack([np.ravel(cost), np.ravel(accuracy)], 1).astype(np.float64)
    order = np.lexsort((-points[:, 1], points[:, 0]))  # by cost, the best accuracy first
    hull: list[np.ndarray] = []
    for p in points[order]:
        if hull and p[0] == hull[-1][0]:
            continue  # the same cost, a worse (or equal) accuracy
        # Pop while the last vertex lies on or below the chord to p (not a strict turn down).
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    vertices = np.asarray(hull)
    best = int(np.argmax(vertices[:, 1]))  # the first (cheapest) of the most accurate
    return vertices[:best + 1]


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def hull_value(hull: np.ndarray, cost: np.ndarray | float) -> np.ndarray:
    """The hull's accuracy at each cost: interpolated between vertices, flat beyond the
    last, NaN below the first (no cascade of the set is that cheap)."""
    cost = np.asarray(cost, np.float64)
    value = np.interp(cost, hull[:, 0], hull[:, 1])
    return np.where(cost < hull[0, 0], np.nan, value)


def aiq(hull: np.ndarray, min_cost: float, max_cost: float) -> float:
    """RouterBench's AIQ: the hull's mean accuracy over costs `[min_cost, max_cost]`,
    counting 0 where the set has no cascade that cheap and its best accuracy beyond its
    last vertex. Their code takes `min_cost = 0`, which scales every compared set's AIQ by
    the same factor `(max_cost - min_cost) / max_cost` when all are costlier than
    `min_cost`."""
    if not max_cost > min_cost:
        raise ValueError(f"AIQ needs max_cost > min_cost, got {min_cost}, {max_cost}")
    start = max(float(hull[0, 0]), min_cost)  # below it the set has nothing: 0
    if start >= max_cost:
        return 0.0
    inner = hull[:, 0][(hull[:, 0] > start) & (hull[:, 0] < max_cost)]
    knots = np.concatenate([[start], inner, [max_cost]])
    values = np.interp(knots, hull[:, 0], hull[:, 1])  # flat beyond the last vertex
    return float(np.trapezoid(values, knots) / (max_cost - min_cost))


def best_within(grid: Grid, gflops_budget: float) -> tuple[int, ...]:
    """The grid point of best accuracy within the budget (the cheapest among equals);
    the cheapest point when none is within it."""
    accuracy, gflops = np.ravel(grid.accuracy), np.ravel(grid.gflops)
    allowed = gflops <= gflops_budget + 1e-12
    if not allowed.any():
        flat = int(np.argmin(gflops))
    else:
        candidates = np.nonzero(allowed)[0]
        order = np.lexsort((gflops[candidates], -accuracy[candidates]))
        flat = int(candidates[order[0]])
    return tuple(int(i) for i in np.unravel_index(flat, grid.accuracy.shape))


def cheapest_reaching(grid: Grid, accuracy: float) -> tuple[int, ...] | None:
    """The cheapest grid point whose accuracy is at least `accuracy` (None if none is)."""
    flat_accuracy, gflops = np.ravel(grid.accuracy), np.ravel(grid.gflops)
    reached = np.nonzero(flat_accuracy >= accuracy - 1e-12)[0]
    if not len(reached):
        return None
    flat = int(reached[np.argmin(gflops[reached])])
    return tuple(int(i) for i in np.unravel_index(flat, grid.accuracy.shape))
