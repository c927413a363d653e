"""Paired comparisons of fine-tuned methods on one target, with bootstrap confidence intervals.

Two methods are compared on the same test records and the same fine-tune seeds: for seed s and
test record r, d[s, r] = metric(A, s, r) - metric(B, s, r). The estimate is the mean of d. Its
95% interval is a two-level percentile bootstrap: each replicate resamples the seeds with
replacement and, independently, the test records with replacement, and takes the mean of d over
the resampled grid. That covers both sources of noise the comparison has at these sizes: which
test records were drawn, and the fine-tune's randomness (LoRA initialisation and data order; for
the random baseline also the selection itself, which its seed draws).

The verdict reads the interval: "better" or "worse" when it excludes zero (in the direction of
the metric: lower loss, higher exact match), else "not distinguishable". With several targets
and methods some intervals exclude zero by chance alone (about 1 in 20 per comparison when
nothing differs); the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Whether a larger value of a metric is better.
HIGHER_IS_BETTER = {"mean_loss": False, "exact_match": True}
PER_RECORD = {"mean_loss": "loss", "exact_match": "exact_match"}


def paired_bootstrap(a: Any, b: Any, *, n_boot: int = 4000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of a - b over a (seeds × records) grid and its two-level percentile interval.

    `a` and `b` are (S, R) arrays: the same S fine-tune seeds and R test records for both.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired arrays must be equal non-empty (seeds, records) grids, got "
                         f"{a.shape} and {b.shape}")
    d = a - b
    s, r = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, (n_boot, s))
    ri = rng.integers(0, r, (n_boot, r))
    # Mean over the resampled grid = mean over seeds of the mean over resampled records.
    per_seed = np.stack([d[:, ri[k]].mean(axis=1) for k in range(n_boot)])  # (n_boot, S)
    means = np.take_along_axis(per_seed, si, axis=1).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": s,
            "records": r, "n_boot": n_boot, "level": level}


def verdict(ci: dict[str, float], metric: str) -> str:
    """"better", "worse" or "not distinguishable" for A against B on `metric`."""
    if ci["lo"] > 0:
        return "better" if HIGHER_IS_BETTER[metric] else "worse"
    if ci["hi"] < 0:
        return "worse" if HIGHER_IS_BETTER[metric] else "better"
    return "not distinguishable"


def compare_runs(evals_a: Sequence[dict[str, Any]], evals_b: Sequence[dict[str, Any]],
                 metric: str, **kw: Any) -> dict[str, Any] | None:
    """A paired comparison from per-seed evaluation documents (RUN/eval/*.json, same seeds in
    the same order for both); None when the metric was not recorded."""
    key = PER_RECORD[metric]
    if not evals_a or any(e.get(key) is None for e in [*evals_a, *evals_b]):
        return None
    ids = [e.get("record_ids") for e in [*evals_a, *evals_b]]
    if any(i != ids[0] for i in ids):
        raise ValueError("paired evaluations must score the same test records")
    a = np.array([e[key] for e in evals_a], np.float64)
    b = np.array([e[key] for e in evals_b], np.float64)
    ci = paired_bootstrap(a, b, **kw)
    return {**ci, "verdict": verdict(ci, metric)}


__all__ = ["HIGHER_IS_BETTER", "compare_runs", "paired_bootstrap", "verdict"]
