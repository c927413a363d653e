"""Invariants of selection: budgets, core knowledge, the walk's constraints, dtypes, compiling."""

from __future__ import annotations

import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from g2is_jax.errors import G2ISError
from g2is_jax.select import (
    allocate_budgets,
    core_knowledge,
    g2is_select,
    gradient_walk,
    pad_to_plan,
    prepare_rows,
    select_kernel,
    select_plan,
)
from g2is_jax.select import walk as walk_mod
from g2is_jax.select.core import STEP_ANCHOR
from g2is_jax.select.walk import _matvec

_FAST = settings(max_examples=40, deadline=None, derandomize=True)
_WALK = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


# ---------------------------------------------------------------------------------------------
# Budgets.


@_FAST
@given(
    total=st.integers(0, 10**6),
    raw=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=12),
)
def test_budgets_sum_to_total_and_follow_weights(total, raw):
    w = np.asarray(raw) / np.sum(raw)
    parts = allocate_budgets(total, w)
    assert parts.sum() == total
    assert np.all(parts >= 0)
    assert np.all(np.abs(parts - total * w) < 1 + 1e-9)  # each part within one row of its share


def test_budget_ties_go_to_the_later_component():
    assert allocate_budgets(3, [0.5, 0.5]).tolist() == [1, 2]
    assert allocate_budgets(10, [0.25, 0.25, 0.5]).tolist() == [2, 3, 5]


# ---------------------------------------------------------------------------------------------
# Core knowledge against an eigen-decomposition of the covariance.


@_FAST
@given(
    seed=st.integers(0, 2**31),
    n_val=st.integers(2, 12),
    dim=st.integers(2, 10),
    p=st.floats(0.05, 0.95),
)
def test_core_knowledge_matches_covariance_eigenvectors(seed, n_val, dim, p):
    v = np.random.default_rng(seed).standard_normal((n_val, dim))
    ck = core_knowledge(v, pca_variance=p, val_normalize="raw")  # the PCA of V as given
    x = v - v.mean(axis=0)
    evals = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1]
    ratios = np.clip(evals, 0, None) / np.clip(evals, 0, None).sum()
    c = len(ck.weights)
    np.testing.assert_allclose(ck.explained_variance_ratio, ratios[:c], atol=1e-10)
    cum = np.cumsum(ratios)
    assert cum[c - 1] > p - 1e-12 and (c == 1 or cum[c - 2] <= p + 1e-12)
    chex.assert_trees_all_close(ck.components @ ck.components.T, np.eye(c), atol=1e-9)
    for comp in ck.components:  # eigenvector of the covariance, largest coordinate positive
        lam = comp @ (x.T @ x) @ comp
        np.testing.assert_allclose((x.T @ x) @ comp, lam * comp, atol=1e-8 * max(1, lam))
        assert comp[np.argmax(np.abs(comp))] > 0
    assert math.isclose(ck.weights.sum(), 1.0)


def test_core_knowledge_single_row_is_its_direction():
    ck = core_knowledge(np.array([[3.0, -4.0]]), val_normalize="raw")
    np.testing.assert_allclose(ck.components, [[0.6, -0.8]])
    assert ck.weights.tolist() == [1.0]


def test_core_knowledge_count_mode_and_errors():
    v = np.random.default_rng(0).standard_normal((6, 5))
    assert core_knowledge(v, n_components=3).components.shape == (3, 5)
    with pytest.raises(G2ISError, match="n_components"):
        core_knowledge(v, n_components=7)
    with pytest.raises(G2ISError, match="pca_variance"):
        core_knowledge(v, pca_variance=1.0)
    with pytest.raises(G2ISError, match="all zero"):
        core_knowledge(np.zeros((3, 4)))


# ---------------------------------------------------------------------------------------------
# The walk's invariants (float64 under x64, so the checks can be exact).


@st.composite
def pools(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_rows, dim = draw(st.integers(8, 120)), draw(st.sampled_from([3, 8]))
    if draw(st.booleans()):
        centres = rng.standard_normal((3, dim))
        t = centres[rng.integers(0, 3, n_rows)] + 0.3 * rng.standard_normal((n_rows, dim))
    else:
        t = rng.standard_normal((n_rows, dim))
    v = rng.standard_normal((draw(st.integers(1, 6)), dim))
    return t, v, max(draw(st.floats(0.05, 0.3)), 1 / n_rows), draw(st.floats(0.05, 1.0))


def _unit(t):
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-10)


@pytest.mark.parametrize("mode", ["onthefly", "graph"])
@_WALK
@given(pool=pools())
def test_walk_invariants(pool, mode):
    t, v, ratio, delta = pool
    with jax.enable_x64(True):
        res = g2is_select(t, v, ratio=ratio, delta=delta, neighbors=4, mode=mode)
        again = g2is_select(t, v, ratio=ratio, delta=delta, neighbors=4, mode=mode)
    np.testing.assert_array_equal(res.indices, again.indices)  # same input, same output
    idx = res.indices.tolist()
    assert len(set(idx)) == len(idx) and all(0 <= i < len(t) for i in idx)
    assert len(idx) <= res.budget == int(len(t) * ratio)
    comps = core_knowledge(v).components
    unit = _unit(t)
    # Components appear in order, contiguously, each opening with its anchor.
    assert res.components.tolist() == sorted(res.components.tolist())
    for c, summary in enumerate(res.per_component):
        rows = res.indices[res.components == c]
        steps = res.steps[res.components == c]
        assert len(rows) == summary["selected"] <= summary["budget"]
        if len(rows) == 0:
            continue
        assert steps[0] == STEP_ANCHOR and np.all(steps[1:] != STEP_ANCHOR)
        block = unit[rows]
        assert np.all(block @ block.T >= -1e-12)  # no conflict inside a component
        k = comps[c]
        s = block[0].copy()
        for row in block[1:]:  # consistency at every step
            old = abs(s @ k) / np.linalg.norm(s) if np.linalg.norm(s) > 1e-10 else 0.0
            s = s + row
            new = abs(s @ k) / np.linalg.norm(s)
            assert new >= delta * old * (1 - 1e-12)


def test_float32_walk_keeps_its_constraints():
    rng = np.random.default_rng(4)
    t = rng.standard_normal((500, 16)).astype(np.float32)
    v = rng.standard_normal((4, 16)).astype(np.float32)
    res = g2is_select(t, v, ratio=0.1, delta=0.8)
    unit = _unit(t.astype(np.float64))
    assert len(res.indices) > 4
    for c in range(len(res.per_component)):
        block = unit[res.indices[res.components == c]]
        assert np.all(block @ block.T >= -1e-5)


def test_bfloat16_storage_selects_like_float32():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((4, 32))
    t = (centres[rng.integers(0, 4, 400)] + 0.3 * rng.standard_normal((400, 32))).astype(np.float32)
    v = (centres[:2] + 0.3 * rng.standard_normal((2, 32))).astype(np.float32)
    t16 = jnp.asarray(t, jnp.bfloat16)
    unit, sq = prepare_rows(t16)
    assert unit.dtype == jnp.bfloat16 and sq.dtype == jnp.float32
    a = g2is_select(t16, v, ratio=0.05, delta=0.8)
    b = g2is_select(t, v, ratio=0.05, delta=0.8)
    assert len(a.indices) == len(b.indices) == 20
    # bfloat16 rounding may reorder near-ties, but the selection is largely the same rows.
    assert len(set(a.indices.tolist()) & set(b.indices.tolist())) >= 12


def test_float64_is_computed_in_float64_under_x64():
    t = np.random.default_rng(0).standard_normal((10, 3))
    with jax.enable_x64(True):
        unit, sq = prepare_rows(t)
        assert unit.dtype == jnp.float64 and sq.dtype == jnp.float64
    unit32, _ = prepare_rows(t)  # without x64: float32, no silent surprise later
    assert unit32.dtype == jnp.float32


def test_matvec_gives_equal_rows_equal_values():
    """The walk breaks ties by index; that needs identical rows to get identical dot products.
    XLA's matvec handles a ragged row tail differently, hence the padding in prepare_rows."""
    rng = np.random.default_rng(0)
    for n_rows, dim in [(1000, 77), (37, 13), (300, 8)]:
        t = rng.standard_normal((n_rows, dim)).astype(np.float32)
        copies = [0, 1, n_rows // 2, n_rows - 3, n_rows - 2, n_rows - 1]
        t[copies] = t[0]
        unit, _ = prepare_rows(t)
        x = np.asarray(
            _matvec(unit, jnp.asarray(rng.standard_normal(dim), jnp.float32), jnp.float32)
        )
        assert np.all(x[copies] == x[0]), (n_rows, dim)


def test_walk_compiles_once_per_shape_bucket(monkeypatch):
    """Pools of one row bucket share the walk program whatever their data, budgets and delta:
    the walk, under a counting jit, traces once for all three selections."""
    counted = jax.jit(chex.assert_max_traces(walk_mod._walk_impl, n=1),
                      static_argnames=walk_mod.WALK_STATIC)
    monkeypatch.setattr(walk_mod, "walk_kernel", counted)
    rng = np.random.default_rng(1)
    t1, t2 = rng.standard_normal((90, 6)), rng.standard_normal((70, 6))
    v1, v2 = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
    g2is_select(t1, v1, ratio=0.2, delta=0.8)
    g2is_select(t2, v2, ratio=0.3, delta=0.5, neighbors=7)  # other N, data, budgets, delta
    g2is_select(t1, v2, ratio=0.1, delta=1.0, pca_variance=0.9)


def test_jitted_kernel_traces_once_per_bucket_and_budget():
    """A user's jit of the kernel: one trace across delta and pools of the same row bucket and
    budget (T padded to the plan), with the host function's indices."""
    rng = np.random.default_rng(1)
    kernel = jax.jit(chex.assert_max_traces(select_kernel, n=1))
    for n, delta in [(90, 0.8), (70, 0.5), (120, 1.0)]:
        t, v = rng.standard_normal((n, 6)), rng.standard_normal((4, 6))
        p = select_plan(t, v, budget=9)
        got = np.asarray(kernel(pad_to_plan(t.astype(np.float32), p), p, delta))
        want = g2is_select(t, v, budget=9, delta=delta).indices
        np.testing.assert_array_equal(got[: len(want)], want)
        assert np.all(got[len(want):] == -1)


def test_walk_skips_zero_budgets_and_respects_budget_vector():
    rng = np.random.default_rng(2)
    unit, sq = prepare_rows(rng.standard_normal((50, 4)).astype(np.float32))
    comps = np.eye(4)[:3]
    out = gradient_walk(unit, sq, comps, [2, 0, 3], n_rows=50, delta=0.1, neighbors=50)
    assert sorted(set(out.components.tolist())) == [0, 2]
    assert np.bincount(out.components, minlength=3).tolist() == [2, 0, 3]


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "^ratio must be"),
        ({"ratio": 1.5}, "^ratio must be"),
        ({"delta": 0.0}, "^delta must be"),
        ({"delta": 1.2}, "^delta must be"),
        ({"neighbors": -1}, "^neighbors must be"),
        ({"mode": "bfs"}, "mode"),
        ({"ratio": 0.001}, "at least"),
        ({"budget": 500}, "larger than the pool"),
    ],
)
def test_bad_parameters_name_the_fix(kwargs, match):
    """Library errors name the Python parameter (and carry it, for the CLI to name its flag)."""
    rng = np.random.default_rng(0)
    t, v = rng.standard_normal((100, 4)), rng.standard_normal((3, 4))
    with pytest.raises(G2ISError, match=match) as info:
        g2is_select(t, v, **kwargs)
    assert "--" not in str(info.value)
    if match.startswith("^"):
        assert info.value.param == next(iter(kwargs))


def test_bad_arrays_name_the_problem():
    rng = np.random.default_rng(0)
    t, v = rng.standard_normal((100, 4)), rng.standard_normal((3, 4))
    with pytest.raises(G2ISError, match="dimensions disagree"):
        g2is_select(t, rng.standard_normal((3, 5)))
    bad = t.copy()
    bad[17, 2] = np.nan
    with pytest.raises(G2ISError, match="row 17"):
        g2is_select(bad, v)
    with pytest.raises(G2ISError, match="NaN or Inf"):
        g2is_select(t, np.full((2, 4), np.inf))
    with pytest.raises(G2ISError, match="empty"):
        g2is_select(t, np.zeros((0, 4)))
    with pytest.raises(G2ISError, match="floating"):
        g2is_select(t.astype(np.int32), v)
    with pytest.raises(G2ISError, match="2-D"):
        g2is_select(t[0], v)
