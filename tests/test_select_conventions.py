"""Every convention a selection depends on, under each of its choices; the sign-free methods;
the composable plan + kernel API; the diagnostics.

* PCA sign rules against scikit-learn (>= 1.5 is v-based; the < 1.5 rule, u-based, is written
  here from its definition and checked against scikit-learn's own
  `svd_flip(u_based_decision=True)`).
* One V normalisation rule for one checkpoint and several.
* g2is-robust (both poles) and g2is-abs (|T·k| ranking) select the same rows whatever the signs
  of the components (hypothesis).
* `select_kernel` under jit / vmap / chex variants equals `g2is_select`.
* The diagnostics' rejection counts equal a brute-force NumPy count.
"""

from __future__ import annotations

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from g2is_jax.select import (
    SelectionInputs,
    SelectOptions,
    core_knowledge,
    g2is_select,
    gradient_walk,
    pad_to_plan,
    prepare_rows,
    run_method,
    select_kernel,
    select_plan,
    walk_directions,
)
from g2is_jax.select import core as core_mod
from g2is_jax.select import diagnostics as diag_mod
from g2is_jax.select.plan import plan_selection

sklearn = pytest.importorskip("sklearn")
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.utils.extmath import svd_flip  # noqa: E402

_PROPS = settings(max_examples=30, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)


def _clustered(seed, n=300, d=12, n_val=6, k=4):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    t = centres[rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, d))
    v = centres[rng.integers(0, k, n_val)] + 0.5 * rng.standard_normal((n_val, d))
    return t, v


# ---------------------------------------------------------------------------------------------
# PCA sign rules.


@pytest.mark.parametrize("normalize", ["raw", "unit"])
@pytest.mark.parametrize("shape", [(5, 8), (12, 6), (30, 40), (3, 100)])
def test_v_based_is_scikit_learns_pca(shape, normalize):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    v = rng.standard_normal(shape) * rng.uniform(0.2, 5, (shape[0], 1))
    count = min(shape) - 1
    ours = core_knowledge(v, n_components=count, pca_sign="v-based", val_normalize=normalize)
    x = _unit(v) if normalize == "unit" else v
    pca = PCA(n_components=count, svd_solver="full").fit(x)
    np.testing.assert_allclose(ours.components, pca.components_, atol=1e-10)
    np.testing.assert_allclose(ours.explained_variance_ratio, pca.explained_variance_ratio_,
                               atol=1e-12)
    # The variance threshold picks the same count as scikit-learn's float n_components.
    for p in (0.3, 0.5, 0.8):
        thr = core_knowledge(v, pca_variance=p, val_normalize=normalize)
        assert len(thr.weights) == PCA(n_components=p, svd_solver="full").fit(x).n_components_


@pytest.mark.parametrize("shape", [(5, 8), (12, 6), (30, 40), (7, 100)])
def test_u_based_is_the_old_scikit_learn_rule(shape):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    v = rng.standard_normal(shape)
    count = min(shape) - 1
    ours = core_knowledge(v, n_components=count, pca_sign="u-based", val_normalize="raw")
    # From the definition: flip each component so the row with the largest |score| is positive.
    pca = PCA(n_components=count, svd_solver="full").fit(v)
    want = pca.components_.copy()
    scores = (v - v.mean(axis=0)) @ want.T
    for c in range(count):
        if scores[np.argmax(np.abs(scores[:, c])), c] < 0:
            want[c] = -want[c]
    np.testing.assert_allclose(ours.components, want, atol=1e-10)
    # And scikit-learn's own < 1.5 rule (svd_flip with u_based_decision=True).
    u, s, vt = np.linalg.svd(v - v.mean(axis=0), full_matrices=False)
    _, vt_old = svd_flip(u, vt, u_based_decision=True)
    np.testing.assert_allclose(ours.components, vt_old[:count], atol=1e-10)
    # Scores are recorded with the oriented components.
    np.testing.assert_allclose(ours.scores, (v - v.mean(axis=0)) @ ours.components.T,
                               atol=1e-10)


def _sign_sensitive_problem():
    """A pool with two clusters on opposite ends of V's first component: the rule decides which
    end the authors' walk starts from."""
    rng = np.random.default_rng(3)
    d = 16
    axis = np.zeros(d)
    axis[0] = 1.0
    base = rng.standard_normal(d) * 0.1
    t = np.concatenate([base + axis + 0.05 * rng.standard_normal((60, d)),
                        base - axis + 0.05 * rng.standard_normal((60, d)),
                        rng.standard_normal((80, d))])
    # V: spread along the axis, the largest |score| row on the -axis side, the largest
    # coordinate positive: v-based and u-based disagree.
    v = np.stack([base + 0.3 * axis, base + 0.35 * axis, base - 0.9 * axis])
    v[:, 1] += np.array([0.01, -0.02, 0.015])
    return t, v


def test_the_sign_rule_changes_g2is_but_not_the_sign_free_methods():
    t, v = _sign_sensitive_problem()
    kv = core_knowledge(v, n_components=1, pca_sign="v-based")
    ku = core_knowledge(v, n_components=1, pca_sign="u-based")
    np.testing.assert_allclose(kv.components, -ku.components)  # the rules disagree here
    common = dict(ratio=0.1, delta=0.8, n_components=1)
    a = g2is_select(t, v, pca_sign="v-based", **common)
    b = g2is_select(t, v, pca_sign="u-based", **common)
    assert set(a.indices.tolist()).isdisjoint(b.indices.tolist())  # opposite ends
    assert a.conventions["pca_sign"] == "v-based" and b.conventions["pca_sign"] == "u-based"
    for handling in ("both-poles", "absolute"):
        ra = g2is_select(t, v, pca_sign="v-based", sign_handling=handling, **common)
        rb = g2is_select(t, v, pca_sign="u-based", sign_handling=handling, **common)
        assert ra.indices.tolist() == rb.indices.tolist()
    robust = g2is_select(t, v, sign_handling="both-poles", **common)
    assert robust.method == "g2is-robust"
    assert {c.pole for c in robust.per_component} == {1, -1}
    sides = [set(np.flatnonzero(robust.components == w)) for w in range(2)]
    assert all(s for s in sides)  # both ends of the component get rows


# ---------------------------------------------------------------------------------------------
# Sign-free methods: properties.


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    n, d = draw(st.integers(20, 140)), draw(st.sampled_from([4, 8, 16]))
    if draw(st.booleans()):
        t, v = _clustered(seed, n=n, d=d, n_val=draw(st.integers(2, 8)),
                          k=draw(st.integers(1, 5)))
    else:
        t = rng.standard_normal((n, d))
        v = rng.standard_normal((draw(st.integers(2, 8)), d))
    pca = ({"n_components": draw(st.integers(1, min(v.shape[0], d)))} if draw(st.booleans())
           else {"pca_variance": draw(st.floats(0.1, 0.9))})
    return dict(t=t, v=v, ratio=max(draw(st.floats(0.02, 0.4)), 1 / n),
                delta=draw(st.floats(0.05, 1.0)), neighbors=draw(st.sampled_from([0, 1, 5, 50])),
                val_normalize=draw(st.sampled_from(["unit", "raw"])), **pca)


def _walk_with(t, know, handling, *, ratio, delta, neighbors):
    """The walk for a given core knowledge (so tests can flip component signs directly)."""
    dirs, weights, _, _, rank_abs = walk_directions(know, handling)
    budgets = core_mod.allocate_budgets(int(len(t) * ratio), weights)
    unit, sq = prepare_rows(t)
    out = gradient_walk(unit, sq, dirs, budgets, n_rows=len(t), delta=delta, neighbors=neighbors,
                        rank_abs=rank_abs)
    return out, budgets


@pytest.mark.parametrize("handling", ["both-poles", "absolute"])
@_PROPS
@given(problem=problems(), flips=st.lists(st.booleans(), min_size=16, max_size=16))
def test_sign_free_walks_ignore_every_component_sign(problem, flips, handling):
    p = dict(problem)
    t, v = p.pop("t"), p.pop("v")
    pca = {k: p.pop(k) for k in ("n_components", "pca_variance") if k in p}
    with jax.enable_x64(True):
        selections = []
        for rule in ("v-based", "u-based"):
            res = g2is_select(t, v, pca_sign=rule, sign_handling=handling, **pca, **p)
            selections.append(res.indices.tolist())
            idx = res.indices.tolist()
            assert len(set(idx)) == len(idx)  # no row twice
            assert sum(c.budget for c in res.per_component) == res.budget == int(len(t) *
                                                                                p["ratio"])
        assert selections[0] == selections[1]
        know = core_knowledge(v, val_normalize=p["val_normalize"], **pca)
        signs = np.where(np.asarray(flips[: len(know.weights)]), -1.0, 1.0)
        flipped = core_mod.CoreKnowledge(know.components * signs[:, None],
                                          know.explained_variance_ratio, know.weights,
                                          know.scores * signs[None, :])
        kw = dict(ratio=p["ratio"], delta=p["delta"], neighbors=p["neighbors"])
        a, budgets_a = _walk_with(t, know, handling, **kw)
        b, budgets_b = _walk_with(t, flipped, handling, **kw)
    assert a.indices.tolist() == b.indices.tolist() == selections[0]
    assert budgets_a.tolist() == budgets_b.tolist()


def test_poles_split_the_budget_by_validation_variance():
    scores = np.array([[3.0], [-1.0], [-1.0], [-1.0]])  # e+ = 9, e- = 3
    know = core_mod.CoreKnowledge(np.array([[0.6, 0.8]]), np.ones(1), np.ones(1), scores)
    dirs, weights, src, pole, _ = walk_directions(know, "both-poles")
    np.testing.assert_allclose(dirs, [[0.6, 0.8], [-0.6, -0.8]])
    np.testing.assert_allclose(weights, [0.75, 0.25])
    assert src.tolist() == [0, 0] and pole.tolist() == [1, -1]
    # Flipped: the same walks in the same order.
    flip = core_mod.CoreKnowledge(-know.components, np.ones(1), np.ones(1), -scores)
    d2, w2, _, p2, _ = walk_directions(flip, "both-poles")
    np.testing.assert_array_equal(d2, dirs)
    np.testing.assert_array_equal(w2, weights)
    assert p2.tolist() == [1, -1]


# ---------------------------------------------------------------------------------------------
# V normalisation, the neighbour list, the less order.


@pytest.mark.parametrize("normalize", ["unit", "raw"])
def test_one_v_rule_for_one_checkpoint_and_several(normalize):
    """Two identical checkpoints of equal weight give the single checkpoint's selection under
    either rule (before, one checkpoint analysed raw V and several unit rows)."""
    t, v = _clustered(5)
    v = v * np.random.default_rng(1).uniform(0.2, 8, (len(v), 1))  # uneven row norms
    v[0] *= 30  # one row dominates the raw PCA
    opts = SelectOptions(ratio=0.05, val_normalize=normalize, diagnostics=False)
    one = run_method("g2is", SelectionInputs([t], [v]), opts)
    two = run_method("g2is", SelectionInputs([t, t], [v, v], np.array([0.5, 0.5])), opts)
    assert one.indices.tolist() == two.indices.tolist()
    assert one.conventions["val_normalize"] == normalize
    other = run_method("g2is", SelectionInputs([t], [v]), SelectOptions(
        ratio=0.05, val_normalize="raw" if normalize == "unit" else "unit", diagnostics=False))
    assert set(other.indices.tolist()).isdisjoint(one.indices.tolist())  # the rule matters


def test_neighbors_zero_is_the_full_sorted_list():
    t, v = _clustered(2)
    a = g2is_select(t, v, ratio=0.1, neighbors=0)
    b = g2is_select(t, v, ratio=0.1, neighbors=len(t))
    c = g2is_select(t, v, ratio=0.1, neighbors=0, mode="graph")
    assert a.indices.tolist() == b.indices.tolist() == c.indices.tolist()
    assert a.conventions["neighbors"] == 0 and not any(s == 2 for s in a.steps)  # no fallback


# ---------------------------------------------------------------------------------------------
# Composition (issue: a public API that composes under jit and vmap).


class KernelTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_kernel_equals_host(self):
        t, v = _clustered(11)
        t32 = t.astype(np.float32)
        for kw in ({"ratio": 0.05}, {"ratio": 0.08, "sign_handling": "both-poles"},
                   {"ratio": 0.05, "sign_handling": "absolute", "neighbors": 0}):
            plan = select_plan(t32, v, **kw)
            got = self.variant(select_kernel)(t32, plan, 0.7)
            want = g2is_select(t32, v, delta=0.7, **kw).indices
            chex.assert_shape(got, (plan.budget,))
            assert got.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got)[: len(want)], want)
            assert np.all(np.asarray(got)[len(want):] == -1)


def test_vmap_over_delta_and_over_plans():
    t, v = _clustered(13)
    t32 = t.astype(np.float32)
    plan = select_plan(t32, v, ratio=0.1)
    deltas = jnp.array([0.3, 0.8, 1.0])
    sweep = jax.vmap(select_kernel, in_axes=(None, None, 0))(t32, plan, deltas)
    chex.assert_shape(sweep, (3, plan.budget))
    for i, d in enumerate([0.3, 0.8, 1.0]):
        want = g2is_select(t32, v, ratio=0.1, delta=d).indices
        np.testing.assert_array_equal(np.asarray(sweep[i])[: len(want)], want)
    # Independent plans (two targets) of one pool, stacked: the same budget, one program.
    _, v2 = _clustered(14)
    plans = [select_plan(t32, vv, budget=12, n_components=2) for vv in (v, v2)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *plans)
    both = jax.jit(jax.vmap(select_kernel, in_axes=(None, 0, None)))(t32, stacked, 0.8)
    for i, vv in enumerate((v, v2)):
        want = g2is_select(t32, vv, budget=12, n_components=2, delta=0.8).indices
        np.testing.assert_array_equal(np.asarray(both[i])[: len(want)], want)


def test_kernel_inside_a_users_jitted_program():
    t, v = _clustered(17)
    t32 = jnp.asarray(t, jnp.float32)
    plan = select_plan(t32, v, ratio=0.05)

    @jax.jit
    def subset_mean(features, plan, delta):
        idx = select_kernel(features, plan, delta)
        rows = jnp.where((idx >= 0)[:, None], features[jnp.maximum(idx, 0)], 0.0)
        return rows.sum(axis=0) / jnp.maximum(jnp.sum(idx >= 0), 1)

    got = subset_mean(t32, plan, 0.8)
    want = np.asarray(t32)[g2is_select(t, v, ratio=0.05).indices].mean(axis=0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_padded_rows_are_never_selected():
    t, v = _clustered(19, n=100)
    plan = select_plan(t, v, ratio=1.0)  # every real row
    got = np.asarray(select_kernel(pad_to_plan(t.astype(np.float32), plan), plan, 0.01))
    real = got[got >= 0]
    assert real.max() < 100 and len(set(real.tolist())) == len(real)


# ---------------------------------------------------------------------------------------------
# Diagnostics.


def _numpy_counts(t, v, res, delta):
    """Brute force: at each walk step, unselected rows a sequential scan would reject."""
    unit = _unit(t)
    know = core_knowledge(v)
    counts = []
    taken = np.zeros(len(t), bool)
    for w, summary in enumerate(res.per_component):
        rows = res.indices[res.components == w]
        k = know.components[summary.component] * (summary.pole or 1)
        conf = cons = cand = 0
        for j in range(len(rows) + 1):
            if j == 0 or (j == len(rows) and len(rows) == summary.budget):
                if j < len(rows):
                    taken[rows[j]] = True
                continue
            chosen = rows[:j]
            s = unit[chosen].sum(axis=0)
            old = abs(s @ k) / np.linalg.norm(s)
            avail = ~taken
            bad = (unit @ unit[chosen].T).min(axis=1) < 0
            news = s[None, :] + unit
            new = np.abs(news @ k) / np.maximum(np.linalg.norm(news, axis=1), 1e-10)
            incons = new < delta * old * (1 - 1e-9)
            conf += int(np.sum(avail & bad))
            cons += int(np.sum(avail & ~bad & incons))
            cand += int(np.sum(avail))
            if j < len(rows):
                taken[rows[j]] = True
        counts.append((conf, cons, cand))
    return counts


def test_walk_diagnostics_count_what_each_rule_rejects():
    rng = np.random.default_rng(21)
    t = rng.standard_normal((150, 6))  # random signs: plenty of conflicts
    v = rng.standard_normal((4, 6))
    with jax.enable_x64(True):
        res = g2is_select(t, v, ratio=0.2, delta=0.9, n_components=2, diagnostics=True)
    got = [(c.conflict_rejected, c.consistency_rejected, c.candidates) for c in res.per_component]
    assert got == _numpy_counts(t, v, res, 0.9)
    assert res.diagnostics["walk"]["conflict_rejected"] > 0
    pool = res.diagnostics["pool"]
    assert 0.3 < pool["negative_pair_fraction"] < 0.7  # random directions: about half
    assert pool["pairs_sampled"] == 150 * 149 // 2
    assert not any("no-conflict rule" in line for line in res.diagnostics["verdict"])


def test_diagnostics_say_when_the_conflict_rule_is_vacuous():
    rng = np.random.default_rng(22)
    shared = rng.standard_normal(32)
    t = shared + 0.3 * rng.standard_normal((200, 32))  # one dominant direction, no conflicts
    v = shared + 0.3 * rng.standard_normal((5, 32))
    res = g2is_select(t, v, ratio=0.05, diagnostics=True)
    pool = res.diagnostics["pool"]
    assert pool["negative_pair_fraction"] == 0.0 and pool["mean_direction_energy"] > 0.8
    words = " ".join(res.diagnostics["verdict"])
    assert "can hardly fire" in words and "shared direction" in words
    assert "nearest-neighbour chain" in words
    assert res.diagnostics["walk"]["conflict_rejected"] == 0


def test_selection_conflicts_of_any_method():
    t = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    got = diag_mod.selection_conflicts(t, [0, 1, 2, 3])
    assert got == {"pairs": 6, "negative_pair_fraction": round(2 / 6, 6)}
    rng = np.random.default_rng(0)
    res = run_method("less", SelectionInputs([rng.standard_normal((80, 5))],
                                             [rng.standard_normal((3, 5))]),
                     SelectOptions(ratio=0.1))
    assert set(res.diagnostics) >= {"pool", "selection", "verdict"}


def test_plan_records_every_convention():
    t, v = _clustered(23)
    _, info = plan_selection(t, v, ratio=0.05, pca_sign="u-based", val_normalize="raw",
                             neighbors=0, sign_handling="both-poles")
    assert info.conventions["pca_sign"] == "u-based"
    assert info.conventions["val_normalize"] == "raw"
    assert info.conventions["sign_handling"] == "both-poles"
    assert info.conventions["neighbors"] == 0
