"""Deferral curves and their summaries: how well a router spends the cloud's compute.

A *router* gives every clip an offload priority; at offload rate `r` the `round(r*n)`
clips of highest priority go to the cloud and the rest keep the edge's answer. Clips
with equal priority are offloaded in random order, and the curve is the *expected*
accuracy over that order. So a router that scores every clip the same (`random`) has
exactly the straight line from edge to cloud, and results never depend on how a sort
happens to break ties. Metrics follow METHODS.md §1 (RouteLLM's AUC, APGR, CPT; the
oracle gap).
"""

from __future__ import annotations

import math

import numpy as np

OFFLOAD_GRID = np.linspace(0.0, 1.0, 101)


def deferral_curve(priority: np.ndarray, edge_correct: np.ndarray, cloud_correct: np.ndarray,
                   rates: np.ndarray = OFFLOAD_GRID) -> np.ndarray:
    """System accuracy at each offload rate in `rates` (expected over ties)."""
    priority = np.asarray(priority, np.float64)
    gain = np.asarray(cloud_correct, np.float64) - np.asarray(edge_correct, np.float64)
    n = len(gain)
    # Group tied priorities, highest first; within a group every clip is equally likely
    # to be offloaded, so each contributes the group's mean gain per offloaded clip.
    levels, inverse = np.unique(-priority, return_inverse=True)
    group_size = np.bincount(inverse, minlength=len(levels)).astype(np.float64)
    group_gain = np.bincount(inverse, weights=gain, minlength=len(levels))
    ends = np.cumsum(group_size)
    starts = ends - group_size
    gain_before = np.cumsum(group_gain) - group_gain
    k = np.rint(np.asarray(rates) * n).astype(int)  # clips offloaded at each rate
    g = np.searchsorted(ends, k, side="left")  # the group the k-th clip falls in
    total = np.where(k == 0, 0.0, gain_before[g] + group_gain[g] * (k - starts[g]) / group_size[g])
    return (np.sum(edge_correct) + total) / n


def oracle_priority(edge_correct: np.ndarray, cloud_correct: np.ndarray) -> np.ndarray:
    """Offloads first the clips the cloud fixes, last those it breaks."""
    return np.asarray(cloud_correct, np.float64) - np.asarray(edge_correct, np.float64)


def pgr(curve: np.ndarray, edge_accuracy: float, cloud_accuracy: float) -> np.ndarray:
    """Performance gap recovered at each rate; NaN when edge and cloud are equally good."""
    gap = cloud_accuracy - edge_accuracy
    if abs(gap) < 1e-12:
        return np.full_like(curve, np.nan)
    return (curve - edge_accuracy) / gap


def cpt(curve: np.ndarray, edge_accuracy: float, cloud_accuracy: float, target: float,
        rates: np.ndarray = OFFLOAD_GRID) -> float:
    """The smallest offload rate whose PGR reaches `target` (NaN if none does)."""
    reached = np.nonzero(pgr(curve, edge_accuracy, cloud_accuracy) >= target - 1e-12)[0]
    return float(rates[reached[0]]) if len(reached) else math.nan


def summarize(curves: dict[str, np.ndarray], edge_accuracy: float,
              cloud_accuracy: float) -> dict[str, dict[str, float]]:
    """AUC, APGR, CPT(50/80/95) and oracle gap of every curve (needs `random`, `oracle`)."""
    auc = {name: float(np.mean(c)) for name, c in curves.items()}
    span = auc["oracle"] - auc["random"]
    out = {}
    for name, curve in curves.items():
        out[name] = {
            "auc": auc[name],
            "auc_trapezoid": trapezoid_auc(curve),
            "apgr": float(np.mean(pgr(curve, edge_accuracy, cloud_accuracy))),
            **{f"cpt_{p}": cpt(curve, edge_accuracy, cloud_accuracy, p / 100)
               for p in (50, 80, 95)},
            "oracle_gap": (auc[name] - auc["random"]) / span if span > 1e-12 else math.nan,
        }
    return out


def auc_difference(priority: np.ndarray, baseline: np.ndarray, edge_correct: np.ndarray,
                   cloud_correct: np.ndarray, num_resamples: int = 1000,
                   seed: int = 0) -> dict[str, float]:
    """AUC(priority) - AUC(baseline) with a 95% paired-bootstrap interval over the clips.

    On a thousand test clips two good routers' AUCs differ in the third or fourth
    decimal, well inside the sampling noise of which clips the edge gets wrong; the
    interval says whether a difference is more than that. Both routers are scored on
    the same resampled clips (paired), which cancels most of that noise."""
    return _paired_difference(priority, baseline, edge_correct, cloud_correct, num_resamples,
                              seed, lambda curve, edge, cloud: float(np.mean(curve)))


def apgr_difference(priority: np.ndarray, baseline: np.ndarray, edge_correct: np.ndarray,
                    cloud_correct: np.ndarray, num_resamples: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """APGR(priority) - APGR(baseline), with a 95% paired-bootstrap interval over the clips
    (each resample's own edge and cloud accuracies)."""
    return _paired_difference(
        priority, baseline, edge_correct, cloud_correct, num_resamples, seed,
        lambda curve, edge, cloud: float(np.mean(pgr(curve, edge, cloud))))


def _paired_difference(priority, baseline, edge_correct, cloud_correct, num_resamples, seed,
                       statistic) -> dict[str, float]:
    edge_correct, cloud_correct = np.asarray(edge_correct), np.asarray(cloud_correct)
    priority, baseline = np.asarray(priority), np.asarray(baseline)

    def difference(rows: np.ndarray) -> float:
        edge, cloud = edge_correct[rows], cloud_correct[rows]
        a = deferral_curve(priority[rows], edge, cloud)
        b = deferral_curve(baseline[rows], edge, cloud)
        return statistic(a, edge.mean(), cloud.mean()) - statistic(b, edge.mean(), cloud.mean())

    rng = np.random.default_rng(seed)
    n = len(edge_correct)
    resampled = [difference(rng.integers(0, n, n)) for _ in range(num_resamples)]
    # A resample with edge and cloud equally accurate has no APGR: left out.
    low, high = (np.nanpercentile(resampled, [2.5, 97.5]) if not np.all(np.isnan(resampled))
                 else (math.nan, math.nan))
    return {"difference": difference(np.arange(n)), "ci95_low": float(low),
            "ci95_high": float(high)}


def threshold_for_rate(scores: np.ndarray, offload_rate: float) -> float:
    """The `tau` offloading a fraction `offload_rate` of clips with `score < tau`."""
    scores = np.sort(np.asarray(scores, np.float64))
    k = int(round(offload_rate * len(scores)))
    if k <= 0:
        return -math.inf
    if k >= len(scores):
        return math.inf
    return float((scores[k - 1] + scores[k]) / 2)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN if one class."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Mid-ranks: the average 1-based rank of each tied group.
    mid_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((mid_rank[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))



def trapezoid_auc(curve: np.ndarray, rates: np.ndarray = OFFLOAD_GRID) -> float:
    """The area under a deferral curve by the trapezoid rule (endpoints half-weighted),
    where `summarize`'s AUC is the mean over the grid (endpoints fully weighted)."""
    return float(np.trapezoid(curve, rates))


def routellm_metrics(priority: np.ndarray, edge_correct: np.ndarray,
                     cloud_correct: np.ndarray, bins: int = 10) -> dict[str, float]:
    """AUC, APGR and the call-performance thresholds as RouteLLM's evaluation computes
    them (`routellm/evals`), for comparison with its papers: thresholds at the `bins`
    equal-count quantile edges of the router's scores (offload where priority >= edge, the
    last edge strictly >), accuracy against the offloaded fraction; AUC by the trapezoid
    rule over those points; APGR as the area between the edge-only and cloud-only lines;
    CPT(p) by linear interpolation of the offloaded fraction at accuracy edge + p*gap."""
    priority = np.asarray(priority, np.float64)
    edge_correct = np.asarray(edge_correct, np.float64)
    cloud_correct = np.asarray(cloud_correct, np.float64)
    edges = np.quantile(priority, np.linspace(0.0, 1.0, bins + 1))
    rates, accuracy = [], []
    for i, edge in enumerate(edges):
        offload = priority > edge if i == len(edges) - 1 else priority >= edge
        rates.append(offload.mean())
        accuracy.append(np.where(offload, cloud_correct, edge_correct).mean())
    order = np.argsort(rates, kind="stable")
    rates, accuracy = np.asarray(rates)[order], np.asarray(accuracy)[order]
    weak, strong = edge_correct.mean(), cloud_correct.mean()
    auc = float(np.trapezoid(accuracy, rates))
    span = rates[-1] - rates[0]
    apgr = (auc - weak * span) / ((strong - weak) * span) if span and strong != weak else math.nan
    out = {"auc": auc, "apgr": float(apgr)}
    for p in (20, 50, 80):  # np.interp needs increasing accuracies, as RouteLLM assumes
        out[f"cpt_{p}"] = float(np.interp(weak + p / 100 * (strong - weak), accuracy, rates))
    return out


def clopper_pearson_upper(failures: int, trials: int, delta: float) -> float:
    """The one-sided (1 - delta) Clopper-Pearson upper bound of a binomial rate."""
    from scipy import stats

    if trials == 0:
        return 1.0
    if failures >= trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - delta, failures + 1, trials - failures))


def guaranteed_threshold(scores: np.ndarray, disagree: np.ndarray, alpha: float,
                         delta: float) -> float:
    """The lowest threshold `tau` (clips with `score >= tau` stay at the edge, the rest go
    to the cloud) whose kept clips disagree with the cloud at a rate <= `alpha`, with
    probability >= 1 - `delta` over the calibration draw.

    Learn-then-test with fixed-sequence testing: candidate thresholds are tested from the
    most conservative downwards, each with a Clopper-Pearson bound at level delta,
    stopping at the first that fails; testing in a fixed order controls the chance that any
    accepted threshold violates alpha at delta (no union bound is needed). The sequence
    starts at the first threshold keeping enough clips for a rejection to be possible at
    all (`(1 - alpha)^k <= delta`), a rule that depends on alpha and delta only, not on
    the labels. The guarantee holds given the calibration scores (their clips' labels
    random); tests check it over fresh draws. Returns +inf (offload everything) if none
    passes."""
    from scipy import stats

    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")
    ranked, bad = scores[order], np.asarray(disagree, bool)[order]
    kept = np.arange(1, len(ranked) + 1)
    failures = np.cumsum(bad)
    # A threshold keeps every clip of a tied score or none: only ends of ties are candidates,
    # and only from the smallest count at which zero disagreements could pass.
    smallest = math.ceil(math.log(delta) / math.log(1.0 - alpha)) if alpha < 1 else 1
    candidate = np.append(ranked[1:] != ranked[:-1], True) & (kept >= smallest)
    upper = np.where(failures >= kept, 1.0,
                     stats.beta.ppf(1.0 - delta, failures + 1, np.maximum(kept - failures, 1)))
    failing = np.nonzero(candidate & (upper > alpha))[0]
    passing = np.nonzero(candidate)[0]
    passing = passing[passing < (failing[0] if len(failing) else len(ranked))]
    return float(ranked[passing[-1]]) if len(passing) else math.inf
