"""Summaries shared by the benchmark scripts: medians over repeats, paired ratios, mean and spread over
seeds."""

from __future__ import annotations

import math
import statistics


def median_after_warmup(values: list[float], warmup: int) -> float:
    """Median of a run's per-step values, skipping the first ``warmup`` steps (all kept if too few)."""
    kept = values[warmup:] or values
    return statistics.median(kept)


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over repeats of ours[i] / theirs[i]: each ratio pairs two runs of the same round."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"need the same non-zero number of runs, got {len(ours)} and {len(theirs)}")
    return statistics.median(a / b for a, b in zip(ours, theirs))


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def curve_over_seeds(curves: list[dict[int, float]]) -> list[tuple[int, float, float]]:
    """(step, mean, std) at every step that all seeds' curves share, in step order."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    return [(step, *mean_and_std([curve[step] for curve in curves])) for step in steps]
