"""Baselines against NumPy written from their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from g2is_jax.errors import G2ISError
from g2is_jax.select import less_scores, less_select, random_select, representation_select


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_less(train, val, weights, subtasks):
    """LESS's order: per subtask, the lr-weighted sum over checkpoints of the mean cosine; then
    the max over subtasks."""
    names = list(dict.fromkeys(subtasks))
    per_task = np.zeros((len(names), train[0].shape[0]))
    for t, v, w in zip(train, val, weights, strict=True):
        cos = _unit(t) @ _unit(v).T
        for g, name in enumerate(names):
            per_task[g] += w * cos[:, [i for i, s in enumerate(subtasks) if s == name]].mean(axis=1)
    return per_task.max(axis=0)


def max_then_sum(train, val, weights, subtasks):
    """The order this project used before (max over subtasks per checkpoint, then the sum)."""
    total = np.zeros(train[0].shape[0])
    for t, v, w in zip(train, val, weights, strict=True):
        cos = _unit(t) @ _unit(v).T
        per_task = [cos[:, [i for i, s in enumerate(subtasks) if s == name]].mean(axis=1)
                    for name in dict.fromkeys(subtasks)]
        total += w * np.max(per_task, axis=0)
    return total


def test_less_sums_checkpoints_before_the_max_over_subtasks():
    """2 checkpoints x 2 subtasks, where the two orders disagree: LESS's order is the one kept."""
    rng = np.random.default_rng(7)
    train = [rng.standard_normal((64, 6)) for _ in range(2)]
    val = [rng.standard_normal((4, 6)) for _ in range(2)]
    subtasks, weights = ["p", "q", "p", "q"], [0.7, 0.3]
    got = less_scores([t.astype(np.float32) for t in train], [v.astype(np.float32) for v in val],
                      weights=weights, subtasks=subtasks)
    want = numpy_less(train, val, weights, subtasks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(want - max_then_sum(train, val, weights, subtasks))) > 1e-3


def test_less_scores_match_definition():
    rng = np.random.default_rng(0)
    train = [rng.standard_normal((300, 8)) for _ in range(3)]
    val = [rng.standard_normal((7, 8)) for _ in range(3)]
    subtasks = ["a", "b", "a", "c", "b", "a", "c"]
    weights = [2e-5, 1e-5, 5e-6]
    got = less_scores(
        [t.astype(np.float32) for t in train],
        [v.astype(np.float32) for v in val],
        weights=weights,
        subtasks=subtasks,
        block_rows=128,  # several blocks, a ragged last one
    )
    # atol: scores are sums of terms of size ~1e-5 (the weights) computed from float32 cosines;
    # where they nearly cancel (one row here, ~3.5e-8) only an absolute bound can hold.
    np.testing.assert_allclose(got, numpy_less(train, val, weights, subtasks), rtol=1e-5,
                               atol=1e-11)


def test_less_select_takes_top_scores_in_order():
    rng = np.random.default_rng(1)
    t, v = rng.standard_normal((200, 5)), rng.standard_normal((4, 5))
    t[3] = t[10] = _unit(v).sum(axis=0)  # the best direction, twice: a tie for first place
    res = less_select([t.astype(np.float32)], [v.astype(np.float32)], ratio=0.1)
    scores = numpy_less([t], [v], [1.0], ["x"] * 4)
    assert len(res.indices) == 20 and res.method == "less"
    want = np.lexsort((np.arange(200), -np.round(scores, 5)))[:20]
    assert set(res.indices.tolist()) == set(want.tolist())
    assert np.all(np.diff(scores[res.indices]) <= 1e-6)
    assert res.indices[:2].tolist() == [3, 10]  # tied, the lower index first


def test_representation_select_is_less_on_hidden_states():
    rng = np.random.default_rng(2)
    r, q = rng.standard_normal((100, 16)), rng.standard_normal((5, 16))
    a = representation_select(r, q, ratio=0.2)
    b = less_select([r], [q], ratio=0.2)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.method == "rds"


def test_random_is_seeded_and_distinct():
    a, b, c = (
        random_select(1000, ratio=0.05, seed=3),
        random_select(1000, ratio=0.05, seed=3),
        random_select(1000, ratio=0.05, seed=4),
    )
    np.testing.assert_array_equal(a.indices, b.indices)
    assert len(set(a.indices.tolist())) == 50 and not np.array_equal(a.indices, c.indices)


def test_baseline_errors():
    rng = np.random.default_rng(0)
    t, v = rng.standard_normal((10, 4)), rng.standard_normal((3, 4))
    with pytest.raises(G2ISError, match="one name per row"):
        less_select([t], [v], ratio=0.5, subtasks=["a", "b"])
    with pytest.raises(G2ISError, match="one of each"):
        less_select([t, t], [v], ratio=0.5)
    with pytest.raises(G2ISError, match="dimensions disagree"):
        less_select([t], [rng.standard_normal((3, 5))], ratio=0.5)
    with pytest.raises(G2ISError, match="^ratio must be") as info:
        random_select(10, ratio=2.0)
    assert info.value.param == "ratio"
