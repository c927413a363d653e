"""Diagnostics of a selection: does the gradient walk's no-conflict rule mean anything here?

G2IS's walk forbids rows whose gradient conflicts (negative dot) with rows already chosen. After
a very short warm-up the Adam term dominates every pool row: most of each unit row lies on one
shared direction, no pair of rows has a negative cosine, the no-conflict rule never fires and the
walk becomes a nearest-neighbour chain. These functions measure that, so every selection and
report can say so:

* `pool_diagnostics(T)`: the share of the pool's (unit-row) feature energy on the mean pool
  direction, and the fraction of negative-cosine pairs among all pairs of a seeded sample of
  rows (exact for the sample, one Gram matrix).
* `walk_diagnostics(T, plan, trace, delta)`: replays a walk (any mode) step by step and counts,
  per walk, the unselected pool rows that the no-conflict rule excluded and those it let through
  but the consistency rule excluded, summed over the walk's steps (plus the failed last step of
  a walk that ended short). One matrix-vector product per selected row, as the walk itself.
* `selection_conflicts(T, indices)`: the fraction of negative-cosine pairs inside any selection
  (e.g. to compare LESS's top-k with G2IS's walk).
* `verdict(...)`: the same in words, with the thresholds named.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from g2is_jax.select import core, walk
from g2is_jax.select.core import ComponentSummary, SelectionResult

_HIGHEST = lax.Precision.HIGHEST
_CHUNK = 8192  # rows per device chunk when streaming T for the pool statistics
# Thresholds of `verdict`: below / above these the words say the conflict rule is (near) vacuous.
LOW_NEGATIVE_PAIRS = 0.01
HIGH_SHARED_ENERGY = 0.5


# ---------------------------------------------------------------------------------------------
# The pool.


@jax.jit
def _unit_chunk(x):
    acc = core.acc_dtype(x.dtype)
    xa = x.astype(acc)
    norms = jnp.sqrt(jnp.sum(xa * xa, axis=1, keepdims=True))
    return xa / jnp.maximum(norms, core.NORM_FLOOR), (norms[:, 0] > core.NORM_FLOOR)


@jax.jit
def _energy_chunk(x, m):
    u, nonzero = _unit_chunk(x)
    proj = jnp.dot(u, m.astype(u.dtype), precision=_HIGHEST)
    return jnp.sum(proj * proj), jnp.sum(nonzero)


def mean_direction(train: Any, *, check: bool = True) -> np.ndarray | None:
    """The mean of the pool's unit rows (N×d), normalised: float64[d]; None when that mean is
    (near) zero. Rows are streamed in chunks (host loop; a memory-mapped T is never loaded
    whole)."""
    t = core.as_features(train, "train features") if check else train
    total = None
    for s in range(0, t.shape[0], _CHUNK):
        u, _ = _unit_chunk(jnp.asarray(t[s:s + _CHUNK]))
        part = jnp.sum(u, axis=0)
        total = part if total is None else total + part
    mean = np.asarray(total, np.float64) / t.shape[0]
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > core.NORM_FLOOR else None


def direction_energy(train: Any, direction: np.ndarray) -> float:
    """The share of the (unit-row) energy of the nonzero rows of `train` on the unit vector
    `direction`: the mean over those rows of cos(row, direction)²."""
    m = jnp.asarray(direction)
    energy, count = 0.0, 0
    for s in range(0, train.shape[0], _CHUNK):
        e, c = _energy_chunk(jnp.asarray(train[s:s + _CHUNK]), m)
        energy, count = energy + float(e), count + int(c)
    return energy / count if count else 0.0


def pool_diagnostics(train: Any, *, sample: int = 512, seed: int = 0,
                     check: bool = True) -> dict[str, Any]:
    """Shared-direction energy and negative-cosine pair fraction of the pool's features (N×d).
    `check=False` skips the finiteness scan (for features checked upstream)."""
    t = core.as_features(train, "train features") if check else train
    n = t.shape[0]
    direction = mean_direction(t, check=False)
    share = 0.0 if direction is None else direction_energy(t, direction)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    u, nonzero = _unit_chunk(jnp.asarray(np.asarray(t[rows])))
    gram = np.asarray(jnp.dot(u, u.T, precision=_HIGHEST), np.float64)
    keep = np.asarray(nonzero)
    iu = np.triu_indices(len(rows), k=1)
    pair_ok = keep[iu[0]] & keep[iu[1]]
    cos = gram[iu][pair_ok]
    return {
        "mean_direction_energy": round(share, 6),
        "negative_pair_fraction": round(float(np.mean(cos < 0)) if cos.size else 0.0, 6),
        "median_pair_cosine": round(float(np.median(cos)) if cos.size else 0.0, 6),
        "pairs_sampled": int(cos.size),
        "sample_rows": int(len(rows)),
        "sample_seed": int(seed),
    }


def selection_conflicts(train: Any, indices: Any) -> dict[str, Any]:
    """Negative-cosine pairs among the selected rows (any method)."""
    idx = np.asarray(indices, np.int64)
    if len(idx) < 2:
        return {"pairs": 0, "negative_pair_fraction": 0.0}
    u, _ = _unit_chunk(jnp.asarray(np.asarray(train[np.sort(idx)])))
    gram = np.asarray(jnp.dot(u, u.T, precision=_HIGHEST), np.float64)
    iu = np.triu_indices(len(idx), k=1)
    return {"pairs": int(len(iu[0])),
            "negative_pair_fraction": round(float(np.mean(gram[iu] < 0)), 6)}


# ---------------------------------------------------------------------------------------------
# Replaying a walk.


@functools.partial(jax.jit, static_argnames=("length",))
def _replay(unit, sq, k, taken, rows, n_sel, short, n_rows, delta, *, length: int):
    """Counts for one walk: rows[0] its anchor, rows[1:n_sel] its steps; `short`: it ended with
    a failed step after rows[n_sel - 1]. Returns (conflict, consistency, candidates)."""
    acc = sq.dtype
    npad = unit.shape[0]
    real = jnp.arange(npad) < n_rows
    sims = walk._canon(walk._matvec(unit, k, acc))
    init = (taken, jnp.full((npad,), jnp.inf, acc), jnp.zeros((npad,), acc),
            jnp.zeros((), acc), jnp.zeros((), acc), jnp.zeros(3, jnp.int32))

    def body(state, j):
        taken, min_dot, dot_s, sk, ss, counts = state
        evaluate = (j >= 1) & ((j < n_sel) | ((j == n_sel) & short))
        avail = real & ~taken
        conflict = avail & (min_dot < 0)
        old = walk._abs_cos(sk, ss)
        new_sq = ss + sq + 2 * dot_s
        new = walk._abs_cos(sk + sims, new_sq)
        inconsistent = avail & (min_dot >= 0) & ~walk._consistent(new, old, delta)
        step = jnp.stack([jnp.sum(conflict), jnp.sum(inconsistent), jnp.sum(avail)])
        counts = counts + jnp.where(evaluate, step.astype(jnp.int32), 0)
        add = j < n_sel
        row = jnp.where(add, rows[j], 0)
        x = walk._canon(walk._matvec(unit, unit[row], acc))
        state = (
            taken.at[row].set(taken[row] | add),
            jnp.where(add, jnp.minimum(min_dot, x), min_dot),
            jnp.where(add, dot_s + x, dot_s),
            jnp.where(add, sk + sims[row], sk),
            jnp.where(add, jnp.where(j == 0, sq[row], new_sq[row]), ss),
            counts,
        )
        return state, None

    state, _ = lax.scan(body, init, jnp.arange(length))
    return state[-1]


def walk_diagnostics(train: Any, plan: Any, indices: np.ndarray, walks: np.ndarray,
                     delta: float) -> list[tuple[int, int, int]]:
    """Per walk of `plan`: (conflict-rejected, consistency-rejected, candidates), summed over its
    steps, for the selection `indices` with walk ids `walks` (host arrays, selection order)."""
    rows_dev = jnp.asarray(np.asarray(plan_rows(train, plan)))
    unit, sq = core.normalise_rows(rows_dev)
    acc = sq.dtype
    comps = np.asarray(plan.components)
    budgets = np.asarray(plan.budgets)
    taken = np.arange(plan.n_padded) >= int(plan.n_rows)
    out = []
    for w in range(len(budgets)):
        mine = np.asarray(indices)[np.asarray(walks) == w]
        if budgets[w] <= 0 or len(mine) == 0:
            out.append((0, 0, 0))
            continue
        length = core.bucket(len(mine) + 1, 8)
        rows = np.zeros(length, np.int32)
        rows[: len(mine)] = mine
        counts = _replay(unit, sq, jnp.asarray(comps[w], acc), jnp.asarray(taken),
                         jnp.asarray(rows), jnp.int32(len(mine)),
                         jnp.asarray(len(mine) < budgets[w]), plan.n_rows,
                         jnp.asarray(delta, acc), length=length)
        out.append(tuple(int(c) for c in np.asarray(counts)))
        taken[mine] = True
    return out


def plan_rows(train: Any, plan: Any) -> np.ndarray:
    """T's rows padded with zero rows to the plan's padded count (host)."""
    t = np.asarray(train)
    if t.shape[0] == plan.n_padded:
        return t
    out = np.zeros((plan.n_padded, t.shape[1]), t.dtype)
    out[: t.shape[0]] = t
    return out


# ---------------------------------------------------------------------------------------------
# Words.


def verdict(pool: dict[str, Any] | None,
            per_component: tuple[ComponentSummary, ...] = ()) -> list[str]:
    """Plain-language warnings about the diagnostics (empty when nothing stands out)."""
    lines = []
    if pool is not None:
        neg, share = pool["negative_pair_fraction"], pool["mean_direction_energy"]
        if neg < LOW_NEGATIVE_PAIRS:
            lines.append(
                f"only {neg:.2%} of {pool['pairs_sampled']:,} sampled pool pairs have a "
                f"negative cosine (threshold {LOW_NEGATIVE_PAIRS:.0%}): the no-conflict rule "
                "can hardly fire (a warm-up too short, or, with Adam features, the optimizer's "
                "first moment shared by every row: scripts/warmup_probe.py --gradients adam,sgd "
                "tells which)")
        if share > HIGH_SHARED_ENERGY:
            lines.append(
                f"{share:.0%} of the pool's feature energy lies on one shared direction (the "
                f"mean pool feature; threshold {HIGH_SHARED_ENERGY:.0%}): a common term "
                "dominates the features")
    counted = [c for c in per_component if c.conflict_rejected is not None and c.candidates]
    if counted and sum(c.conflict_rejected for c in counted) == 0:
        lines.append("the no-conflict rule rejected no candidate at any walk step: the walk "
                     "reduced to a nearest-neighbour chain")
    return lines


def diagnose(result: SelectionResult, train: Any, plan: Any | None = None,
             *, sample: int = 512, seed: int = 0,
             pool: dict[str, Any] | None = None) -> SelectionResult:
    """`result` with its diagnostics filled in: pool statistics (or `pool` when given, computed
    once per feature set), conflicts inside the selection, and for a walk (`plan` given) the
    per-walk rejection counts."""
    if pool is None:
        pool = pool_diagnostics(train, sample=sample, seed=seed, check=False)
    per = result.per_component
    if plan is not None and len(result.indices):
        counts = walk_diagnostics(train, plan, result.indices, result.components,
                                  float(result.conventions.get("delta", 0.8)))
        per = tuple(
            ComponentSummary(**{**c.to_json(), "conflict_rejected": k[0],
                                "consistency_rejected": k[1], "candidates": k[2]})
            for c, k in zip(per, counts, strict=False))
    diag = {"pool": pool, "selection": selection_conflicts(train, result.indices)}
    if plan is not None:
        diag["walk"] = {
            "conflict_rejected": int(sum(c.conflict_rejected or 0 for c in per)),
            "consistency_rejected": int(sum(c.consistency_rejected or 0 for c in per)),
            "candidates": int(sum(c.candidates or 0 for c in per)),
        }
    diag["verdict"] = verdict(pool, per)
    return result.with_diagnostics(diag, per)


__all__ = ["HIGH_SHARED_ENERGY", "LOW_NEGATIVE_PAIRS", "diagnose", "plan_rows",
           "pool_diagnostics", "selection_conflicts", "verdict", "walk_diagnostics"]
