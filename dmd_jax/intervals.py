"""Uncertainty of the figures in the tables: spread over seeds, paired bootstrap intervals."""

from __future__ import annotations

import numpy as np


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired_accuracy_difference(correct_a: np.ndarray, correct_b: np.ndarray,
                               num_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Accuracy of A minus accuracy of B on the same clips, with a 95% paired bootstrap
    interval over the clips.

    The per-clip difference is +1, 0 or -1, so a resample's mean difference only depends
    on how many of each it drew: three counts from a multinomial, the same distribution as
    resampling the clips one by one at a fraction of the cost."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired clips needed, got shapes {a.shape} and {b.shape}")
    n = len(a)
    wins, losses = float(np.sum(a & ~b)), float(np.sum(~a & b))
    difference = (wins - losses) / n
    result = {"difference": difference, "clips": n}
    if num_resamples > 0:
        p = np.asarray([wins, n - wins - losses, losses]) / n
        counts = np.random.default_rng(seed).multinomial(n, p, size=num_resamples)
        resampled = (counts[:, 0] - counts[:, 2]) / n
        low, high = np.percentile(resampled, [2.5, 97.5])
        result.update(ci95_low=float(low), ci95_high=float(high))
    return result
