"""dmd_jax.cascade: grids of cascades against a clip-by-clip simulation, the non-decreasing
convex hull's defining properties, AIQ against numerical integration."""

import itertools

import numpy as np
import pytest

from dmd_jax import cascade, routing
from dmd_jax.errors import UserError


def _random_tiers(rng, n, tiers):
    correct = [rng.random(n) < p for p in np.linspace(0.5, 0.9, tiers)]
    scores = [rng.random(n) + 0.3 * c for c in correct[:-1]]  # informative, no ties
    costs = list(rng.uniform(0.1, 1.0, tiers) * np.geomspace(1, 8, tiers))
    return correct, scores, costs


def _simulate(correct, scores, thresholds, costs):
    """Clip by clip: climb while the score is below the hop's threshold."""
    n = len(correct[0])
    right, spent, reach = 0.0, 0.0, np.zeros(len(correct))
    for i in range(n):
        tier = 0
        spent += costs[0]
        reach[0] += 1
        while tier < len(thresholds) and scores[tier][i] < thresholds[tier]:
            tier += 1
            spent += costs[tier]
            reach[tier] += 1
        right += correct[tier][i]
    return right / n, spent / n, reach / n


@pytest.mark.parametrize("tiers", [2, 3, 4])
def test_grid_matches_a_clip_by_clip_simulation(tiers):
    rng = np.random.default_rng(tiers)
    correct, scores, costs = _random_tiers(rng, 200, tiers)
    rates = np.linspace(0, 1, 6)
    thresholds = [cascade.hop_thresholds(s, rates) for s in scores]
    grid = cascade.evaluate(correct, scores, thresholds, costs, [rates] * (tiers - 1))
    assert grid.accuracy.shape == (6,) * (tiers - 1)
    for index in itertools.product(range(6), repeat=tiers - 1):
        taus = [t[i] for t, i in zip(thresholds, index)]
        accuracy, spent, reach = _simulate(correct, scores, taus, costs)
        assert grid.accuracy[index] == pytest.approx(accuracy, abs=1e-12)
        assert grid.gflops[index] == pytest.approx(spent, abs=1e-12)
        np.testing.assert_allclose(grid.reach[index], reach, atol=1e-12)


def test_two_tiers_are_the_deferral_curve_and_a_closed_hop_is_the_shorter_cascade():
    rng = np.random.default_rng(0)
    correct, scores, costs = _random_tiers(rng, 300, 3)
    rates = routing.OFFLOAD_GRID
    two = cascade.evaluate([correct[0], correct[2]], [scores[0]],
                           [cascade.hop_thresholds(scores[0], rates)], [costs[0], costs[2]])
    # No tied scores: the threshold curve is the deferral curve at every rate.
    np.testing.assert_allclose(two.accuracy, routing.deferral_curve(-scores[0], correct[0],
                                                                    correct[2]), atol=1e-12)
    three = cascade.evaluate(correct, scores, [cascade.hop_thresholds(s, rates) for s in scores],
                             costs)
    # The middle passing everything on (rate 1) is edge -> cloud, paying for the middle too.
    np.testing.assert_allclose(three.accuracy[:, -1], two.accuracy, atol=1e-12)
    np.testing.assert_allclose(three.gflops[:, -1] - two.gflops,
                               costs[1] * three.reach[:, -1, 1], atol=1e-12)
    # ... and keeping everything (rate 0) is edge -> middle.
    assert three.reach[:, 0, 2].max() == 0.0


def test_a_grid_too_large_to_hold_is_refused():
    n = 1000
    with pytest.raises(UserError, match="too large"):
        cascade.evaluate([np.ones(n)] * 4, [np.zeros(n)] * 3, [np.zeros(300)] * 3, [1, 2, 3, 4])


def test_non_decreasing_hull_has_its_defining_properties():
    rng = np.random.default_rng(1)
    for trial in range(20):
        cost = rng.uniform(0, 10, 60).round(1)  # rounded: equal costs happen
        accuracy = rng.uniform(0, 1, 60)
        hull = cascade.non_decreasing_hull(cost, accuracy)
        points = set(zip(cost.tolist(), accuracy.tolist()))
        assert all((c, a) in points for c, a in hull.tolist())  # vertices are points
        assert np.all(np.diff(hull[:, 0]) > 0) and np.all(np.diff(hull[:, 1]) > 0)
        slopes = np.diff(hull[:, 1]) / np.diff(hull[:, 0])
        assert np.all(np.diff(slopes) < 1e-12)  # concave
        cheapest = cost == cost.min()
        assert hull[0].tolist() == [cost.min(), accuracy[cheapest].max()]
        assert hull[-1, 1] == accuracy.max()
        # Nothing lies above it (beyond its first vertex).
        above = accuracy - cascade.hull_value(hull, cost)
        assert np.nanmax(above) <= 1e-12


def test_hull_of_a_curve_that_falls_after_its_peak_stays_flat():
    hull = cascade.non_decreasing_hull([0, 1, 2, 3], [0.5, 0.8, 0.7, 0.6])
    assert hull.tolist() == [[0, 0.5], [1, 0.8]]
    assert cascade.hull_value(hull, 3.0) == pytest.approx(0.8)
    assert np.isnan(cascade.hull_value(np.asarray([[1.0, 0.5], [2.0, 0.9]]), 0.5))


def test_aiq_is_the_mean_height_over_the_cost_range():
    rng = np.random.default_rng(2)
    for trial in range(10):
        hull = cascade.non_decreasing_hull(rng.uniform(1, 5, 30), rng.uniform(0, 1, 30))
        low, high = 0.5, 6.0
        dense = np.linspace(low, high, 400_001)
        height = np.nan_to_num(cascade.hull_value(hull, dense), nan=0.0)  # 0 where none
        assert cascade.aiq(hull, low, high) == pytest.approx(height.mean(), abs=1e-4)
    # RouterBench's code: trapezoids from the first vertex, extended flat, over [0, max].
    hull = np.asarray([[1.0, 0.2], [2.0, 0.6], [3.0, 0.7]])
    extended = np.vstack([hull, [4.0, 0.7]])
    assert cascade.aiq(hull, 0.0, 4.0) == pytest.approx(
        np.trapezoid(extended[:, 1], extended[:, 0]) / 4.0)
    assert cascade.aiq(np.asarray([[2.0, 0.9]]), 0.0, 1.0) == 0.0


def test_best_within_prefers_accuracy_then_cost():
    grid = cascade.Grid(rates=(np.arange(3.0), np.arange(2.0)), thresholds=(np.zeros(3),) * 2,
                        accuracy=np.asarray([[0.5, 0.7], [0.7, 0.9], [0.8, 0.9]]),
                        gflops=np.asarray([[1.0, 2.0], [1.5, 3.0], [2.5, 2.8]]),
                        reach=np.zeros((3, 2, 3)))
    assert cascade.best_within(grid, 2.0) == (1, 0)  # 0.7 at 1.5 beats 0.7 at 2.0
    assert cascade.best_within(grid, 2.6) == (2, 0)  # 0.8
    assert cascade.best_within(grid, 10.0) == (2, 1)  # 0.9 at 2.8, not at 3.0
    assert cascade.best_within(grid, 0.1) == (0, 0)  # nothing within: the cheapest
    assert cascade.cheapest_reaching(grid, 0.9) == (2, 1)
    assert cascade.cheapest_reaching(grid, 0.95) is None
