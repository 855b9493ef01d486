"""Deferral-curve metrics against hand-computed examples (ties, all-right and all-wrong edges)."""

import math

import numpy as np
import pytest

from dmd_jax import routing

RATES = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
# Four clips: the edge is right on 0 and 1, the cloud on 0, 2 and 3.
EDGE = np.array([1, 1, 0, 0])
CLOUD = np.array([1, 0, 1, 1])


def test_curve_follows_priority_order():
    # Offload order 2, 3, 1, 0: fix two clips, then break one, then change nothing.
    curve = routing.deferral_curve(np.array([0.1, 0.2, 0.9, 0.8]), EDGE, CLOUD, RATES)
    np.testing.assert_allclose(curve, [0.5, 0.75, 1.0, 0.75, 0.75])


def test_ties_give_the_expected_accuracy():
    # Clips 1 and 2 tie at the top: offloading one of them gains (-1 + 1) / 2 = 0 on average.
    curve = routing.deferral_curve(np.array([0.0, 0.5, 0.5, 0.2]), EDGE, CLOUD, RATES)
    np.testing.assert_allclose(curve, [0.5, 0.5, 0.5, 0.75, 0.75])


def test_constant_priority_is_the_straight_line():
    rng = np.random.default_rng(0)
    edge, cloud = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    curve = routing.deferral_curve(np.zeros(200), edge, cloud)
    np.testing.assert_allclose(
        curve, edge.mean() + routing.OFFLOAD_GRID * (cloud.mean() - edge.mean()), atol=1e-12)


def test_oracle_fixes_first_and_breaks_last():
    curve = routing.deferral_curve(routing.oracle_priority(EDGE, CLOUD), EDGE, CLOUD, RATES)
    np.testing.assert_allclose(curve, [0.5, 0.75, 1.0, 1.0, 0.75])


def test_pgr_and_cpt():
    curve = np.array([0.5, 0.6, 0.8, 0.9, 0.9])
    np.testing.assert_allclose(routing.pgr(curve, 0.5, 0.9), [0, 0.25, 0.75, 1, 1])
    assert routing.cpt(curve, 0.5, 0.9, 0.5, RATES) == 0.5
    assert routing.cpt(curve, 0.5, 0.9, 0.95, RATES) == 0.75
    assert math.isnan(routing.cpt(np.array([0.5] * 5), 0.5, 0.9, 0.5, RATES))


def test_summary_of_random_and_oracle():
    edge = np.tile([1, 0, 0, 1, 0, 1, 1, 0], 25)  # 200 clips: every grid rate is whole clips
    cloud = np.tile([1, 1, 1, 0, 1, 1, 1, 0], 25)
    curves = {"random": routing.deferral_curve(np.zeros(200), edge, cloud),
              "oracle": routing.deferral_curve(routing.oracle_priority(edge, cloud), edge, cloud)}
    summary = routing.summarize(curves, edge.mean(), cloud.mean())
    assert summary["random"]["oracle_gap"] == 0.0 and summary["oracle"]["oracle_gap"] == 1.0
    # The straight line from 0.5 to 0.75 averages to 0.625; its PGR averages to 0.5.
    assert summary["random"]["auc"] == pytest.approx(0.625)
    assert summary["random"]["apgr"] == pytest.approx(0.5)
    assert summary["random"]["cpt_50"] == pytest.approx(0.5)
    # PGR 0.95 needs 0.95 * 50 = 47.5 more right answers: the oracle's first 48 clips.
    assert summary["oracle"]["cpt_95"] == pytest.approx(0.24)


@pytest.mark.parametrize("edge_value", [0, 1])
def test_all_right_or_all_wrong_edge(edge_value):
    edge = np.full(10, edge_value)
    cloud = np.array([1, 0] * 5)
    curve = routing.deferral_curve(np.linspace(0, 1, 10), edge, cloud)
    assert curve[0] == edge_value and curve[-1] == 0.5
    summary = routing.summarize(
        {"random": routing.deferral_curve(np.zeros(10), edge, cloud), "oracle": curve,
         "router": curve}, edge.mean(), cloud.mean())
    assert np.isfinite(summary["router"]["apgr"])


def test_equal_edge_and_cloud_make_pgr_undefined_not_an_error():
    curve = routing.deferral_curve(np.zeros(4), EDGE, EDGE, RATES)
    assert np.all(np.isnan(routing.pgr(curve, 0.5, 0.5)))


def test_threshold_offloads_the_target_fraction():
    scores = np.random.default_rng(1).uniform(size=1000)
    for rate in (0.0, 0.1, 0.35, 1.0):
        assert np.mean(scores < routing.threshold_for_rate(scores, rate)) == pytest.approx(rate)


def test_auroc_hand_computed_with_ties():
    # Positive scores 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4, 0.4>0.1).
    assert routing.auroc(np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])) == 0.875
    assert routing.auroc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert math.isnan(routing.auroc(np.array([0.1, 0.9]), np.array([1, 1])))



def test_auc_difference_and_its_bootstrap_interval():
    rng = np.random.default_rng(1)
    edge, cloud = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    oracle = routing.oracle_priority(edge, cloud)
    # A router against itself: exactly 0, in every resample.
    same = routing.auc_difference(oracle, oracle, edge, cloud, num_resamples=50)
    assert same == {"difference": 0.0, "ci95_low": 0.0, "ci95_high": 0.0}
    # The oracle against random (a constant priority): the difference is the two AUCs'
    # and its interval lies clearly above 0 and contains it.
    better = routing.auc_difference(oracle, np.zeros(400), edge, cloud, num_resamples=200)
    expected = (np.mean(routing.deferral_curve(oracle, edge, cloud))
                - np.mean(routing.deferral_curve(np.zeros(400), edge, cloud)))
    assert better["difference"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < better["ci95_low"] < better["difference"] < better["ci95_high"]
    # Swapping the routers mirrors the interval; the same seed gives the same interval.
    worse = routing.auc_difference(np.zeros(400), oracle, edge, cloud, num_resamples=200)
    assert worse["ci95_high"] == pytest.approx(-better["ci95_low"])
    assert routing.auc_difference(oracle, np.zeros(400), edge, cloud, num_resamples=200) == better


def test_routellm_metrics_follow_routellms_evaluation():
    """RouteLLM's procedure on a hand-checkable case: 10 clips, priorities 0..9, so the
    decile edges (0, 0.9, ..., 9) offload the top 10, 9, ..., 1 clips and, at the last
    edge (strictly greater), none."""
    priority = np.arange(10.0)
    edge_correct = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 0], float)
    cloud_correct = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], float)
    rates = np.arange(11) / 10
    # offload the k highest priorities: clips 9, 8, ... take the cloud's answer
    accuracy = np.array([(edge_correct[:10 - k].sum() + cloud_correct[10 - k:].sum()) / 10
                         for k in range(11)])
    weak, strong = 0.5, 0.9
    auc = np.sum((accuracy[1:] + accuracy[:-1]) / 2 * 0.1)
    ours = routing.routellm_metrics(priority, edge_correct, cloud_correct)
    assert ours["auc"] == pytest.approx(auc)
    assert ours["apgr"] == pytest.approx((auc - weak) / (strong - weak))
    # CPT(50%): accuracy 0.7 first reached between rates: interpolate as np.interp does
    assert ours["cpt_50"] == pytest.approx(np.interp(0.7, accuracy, rates))


def test_trapezoid_auc_half_weights_the_endpoints():
    grid = routing.OFFLOAD_GRID
    assert routing.trapezoid_auc(grid ** 2) == pytest.approx(1 / 3 + 0.01 ** 2 / 6)
    assert float(np.mean(grid ** 2)) == pytest.approx(201 / 600)  # the grid mean: another number


def test_guaranteed_threshold_bounds_the_disagreement_it_promises():
    """Over many calibration draws, the realised disagreement among the clips kept at the
    edge exceeds alpha in at most a delta fraction of them (the population is known here:
    the disagreement probability of a clip falls with its score)."""
    rng = np.random.default_rng(0)
    alpha, delta, draws, violations = 0.2, 0.1, 200, 0

    def population(n):
        scores = rng.random(n)
        return scores, rng.random(n) < 0.6 * (1 - scores)  # P(disagree | s) = 0.6 (1 - s)

    test_scores, test_bad = population(200_000)
    kept_rates = []
    for _ in range(draws):
        scores, bad = population(500)
        tau = routing.guaranteed_threshold(scores, bad, alpha, delta)
        kept = test_scores >= tau
        kept_rates.append(kept.mean())
        violations += kept.any() and test_bad[kept].mean() > alpha
    assert violations / draws <= delta
    assert np.mean(kept_rates) > 0.3  # not vacuous: it keeps a good share at the edge
    # Clopper-Pearson: 0 failures in 10 trials bounds the rate by 1 - delta^(1/10).
    assert routing.clopper_pearson_upper(0, 10, 0.1) == pytest.approx(1 - 0.1 ** 0.1)


def test_apgr_difference_is_paired_and_exact_on_the_full_sample():
    rng = np.random.default_rng(0)
    edge, cloud = rng.random(400) < 0.6, rng.random(400) < 0.9
    good, noise = (cloud.astype(float) - edge) + 0.1 * rng.random(400), rng.random(400)
    same = routing.apgr_difference(good, good, edge, cloud, 50)
    assert same["difference"] == same["ci95_low"] == same["ci95_high"] == 0.0
    d = routing.apgr_difference(good, noise, edge, cloud, 200)
    e, c = edge.mean(), cloud.mean()
    apgr = lambda p: np.mean(routing.pgr(routing.deferral_curve(p, edge, cloud), e, c))
    assert d["difference"] == pytest.approx(apgr(good) - apgr(noise))
    assert 0 < d["ci95_low"] < d["difference"] < d["ci95_high"]
