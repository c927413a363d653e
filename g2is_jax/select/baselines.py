"""Baselines behind the same interface as `g2is_select`: random, LESS, representation similarity.

* `random_select`: a uniform sample without replacement from a seeded NumPy Generator.
* `less_select` (Xia et al., 2024): score each pool row by the cosine of its gradient feature with
  every validation row, mean within each target subtask, summed over checkpoints weighted by
  their learning rate, then the max over subtasks (LESS's order: the checkpoint sum comes first);
  the top int(N·ratio) rows. Cosines are scale-free, so V's row normalisation does not matter.
* `representation_select` (LESS's RDS baseline): the same scoring on representation features
  (e.g. the final hidden state) instead of gradients, one "checkpoint" of weight 1. Extracting the
  hidden states belongs to the model code; this takes the arrays.

Scores are computed over row blocks in one jitted kernel (memory O(block·n), never N×N) and the
top rows are taken by `lax.top_k`: score descending, index ascending on ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from g2is_jax.errors import G2ISError
from g2is_jax.select import core
from g2is_jax.select.core import SelectionResult

_HIGHEST = lax.Precision.HIGHEST


def _result(indices: np.ndarray, method: str, total: int, **conventions: Any
            ) -> SelectionResult:
    k = len(indices)
    minus = -np.ones(k, np.int64)
    return SelectionResult(np.asarray(indices, np.int64), minus, minus, (), method, total,
                           conventions=conventions)


def _total(n_rows: int, ratio: float, budget: int | None) -> int:
    if budget is not None:
        return core.check_budget(budget, n_rows)
    return core.total_budget(n_rows, ratio)


def random_select(
    n_rows: int, *, ratio: float = 0.01, budget: int | None = None, seed: int = 0
) -> SelectionResult:
    """int(N·ratio) distinct rows drawn uniformly; the same seed gives the same rows."""
    total = _total(n_rows, ratio, budget)
    rng = np.random.default_rng(seed)
    return _result(rng.permutation(n_rows)[:total], "random", total, seed=int(seed))


def subtask_matrix(subtasks: Sequence[str] | None, n_val: int) -> np.ndarray:
    """(n, G) averaging matrix: column g holds 1/|g| on the rows of subtask g (first-seen order)."""
    if subtasks is None:
        return np.full((n_val, 1), 1.0 / n_val)
    labels = [str(s) for s in subtasks]
    if len(labels) != n_val:
        raise G2ISError(
            f"{len(labels)} subtask names for {n_val} validation rows; give one name per row"
        )
    names = list(dict.fromkeys(labels))
    m = np.zeros((n_val, len(names)))
    for row, name in enumerate(labels):
        m[row, names.index(name)] = 1.0
    return m / m.sum(axis=0, keepdims=True)


@jax.jit
def _block_scores(t_block, v_unit, avg):
    acc = core.acc_dtype(t_block.dtype)
    tb = t_block.astype(acc)
    tb = tb / jnp.maximum(jnp.linalg.norm(tb, axis=1, keepdims=True), core.NORM_FLOOR)
    cos = jnp.dot(tb, v_unit.T, precision=_HIGHEST)  # (B, n)
    return jnp.dot(cos, avg, precision=_HIGHEST)  # (B, G): mean cosine per subtask


def less_scores(
    train: Sequence[Any],
    val: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    subtasks: Sequence[str] | None = None,
    block_rows: int = 8192,
) -> np.ndarray:
    """LESS scores (N,): the lr-weighted sum over checkpoints of each subtask's mean cosine, then
    the max over subtasks."""
    if len(train) != len(val) or not train:
        raise G2ISError(
            f"{len(train)} train and {len(val)} validation feature sets; give one of each per "
            "checkpoint, in the same order", param="train"
        )
    weights = np.ones(len(train)) if weights is None else np.asarray(weights, np.float64)
    chex.assert_shape(weights, (len(train),))
    n_rows = train[0].shape[0]
    total = None
    for t, v in zip(train, val, strict=True):
        core.check_dims(t, v)
        if t.shape[0] != n_rows:
            raise G2ISError(
                f"checkpoints disagree on the pool size ({t.shape[0]} vs {n_rows} rows); "
                "compute every checkpoint's features on the same pool file"
            )
    for t, v, w in zip(train, val, weights, strict=True):
        vv = core.as_features(v, "validation features")
        acc = core.acc_dtype(vv.dtype)
        v_unit = vv.astype(acc)
        v_unit = v_unit / jnp.maximum(jnp.linalg.norm(v_unit, axis=1, keepdims=True), 1e-10)
        avg = jnp.asarray(subtask_matrix(subtasks, vv.shape[0]), acc)
        parts = []
        for s in range(0, n_rows, block_rows):
            block = core.as_features(t[s : s + block_rows], "train features")
            if block.shape[0] < block_rows and n_rows > block_rows:  # one compiled shape
                block = jnp.pad(block, ((0, block_rows - block.shape[0]), (0, 0)))
            parts.append(np.asarray(_block_scores(block, v_unit, avg)))
        score = np.concatenate(parts)[:n_rows] * w  # (N, G)
        total = score if total is None else total + score
    return total.max(axis=1)


def top_k_rows(scores: Any, k: int) -> np.ndarray:
    """The k highest-scoring rows, score descending, index ascending on ties."""
    s = jnp.asarray(scores)
    _, idx = lax.top_k(jnp.where(s == 0, 0, s), k)
    return np.asarray(idx, np.int64)


def less_select(
    train: Sequence[Any],
    val: Sequence[Any],
    *,
    ratio: float = 0.01,
    budget: int | None = None,
    weights: Sequence[float] | None = None,
    subtasks: Sequence[str] | None = None,
) -> SelectionResult:
    """LESS: the top int(N·ratio) rows by `less_scores` (one array per checkpoint)."""
    scores = less_scores(train, val, weights=weights, subtasks=subtasks)
    total = _total(len(scores), ratio, budget)
    return _result(top_k_rows(scores, total), "less", total, **_less_conventions(
        len(train), weights, subtasks))


def _less_conventions(n_ckpt: int, weights: Any, subtasks: Any) -> dict[str, Any]:
    w = np.ones(n_ckpt) if weights is None else np.asarray(weights, np.float64)
    return {"checkpoint_weights": [float(x) for x in w],
            "subtasks": 1 if subtasks is None else len(dict.fromkeys(subtasks)),
            "order": "lr-weighted sum over checkpoints, then max over subtasks",
            "val_normalize": "none needed (cosine scores)"}


def representation_select(
    train_reps: Any,
    val_reps: Any,
    *,
    ratio: float = 0.01,
    budget: int | None = None,
    subtasks: Sequence[str] | None = None,
) -> SelectionResult:
    """Representation similarity (RDS): LESS scoring on hidden-state features, top rows."""
    scores = less_scores([train_reps], [val_reps], subtasks=subtasks)
    total = _total(len(scores), ratio, budget)
    return _result(top_k_rows(scores, total), "rds", total,
                   **_less_conventions(1, None, subtasks))
