"""Selection as host planning plus one pure device kernel.

`select_plan(T, V, **options)` is the host half: it checks the arrays, runs the PCA of V (whose
size depends on the data), turns the components into walk directions and integer budgets, and
pads everything to static buckets. It returns a `SelectPlan`, a pytree of arrays with a few
static sizes. `select_kernel(T, plan, delta)` is the device half: a pure function that
normalises T's rows and runs the gradient walk (walk.py), returning `plan.budget` row indices in
selection order, -1 where a component ended short. It composes:

    plan = select_plan(T, V, ratio=0.01)
    idx = jax.jit(select_kernel)(T, plan, 0.8)
    sweep = jax.vmap(select_kernel, in_axes=(None, None, 0))(T, plan, jnp.array([0.5, 0.8]))

and works inside a user's own jitted program. Rows of T beyond `plan.n_rows` (up to the plan's
padded row count) are never selected, so T may be given padded (`pad_to_plan`): then every pool
of the same row bucket and budget shares one compiled program. `g2is_select` is plan + kernel +
the result object, with the arrays checked once.

Conventions are parameters, recorded in every result (`SelectionResult.conventions`):

* ``pca_sign``: the arbitrary sign of each principal component ("v-based", scikit-learn >= 1.5,
  the default; "u-based", scikit-learn < 1.5). The authors' walk ranks anchors and fallback rows
  by *signed* similarity to a component, so the rule can change what is selected.
* ``val_normalize``: V's rows unit-normalised before the PCA ("unit", default, as LESS stores
  validation features) or used as given ("raw").
* ``neighbors``: the neighbour-list width; 100 is this project's default (the authors' graph
  width is unspecified), 0 means the full sorted list.
* ``sign_handling``: "signed" (the authors' method, one walk along each oriented component),
  "both-poles" (method ``g2is-robust``: each component walked from both ends, +k and -k, its
  budget split by the validation variance on each side) or "absolute" (method ``g2is-abs``: one
  walk per component whose anchor and fallback rows rank by |T·k|). The last two give the same
  selection whatever the components' signs (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from g2is_jax import sharding
from g2is_jax.errors import G2ISError
from g2is_jax.select import core, walk
from g2is_jax.select.core import (
    STEP_FALLBACK,
    STEP_NEIGHBOR,
    ComponentSummary,
    CoreKnowledge,
    SelectionResult,
)
from g2is_jax.vocab import SIGN_HANDLING, SignHandling  # noqa: F401

DEFAULT_NEIGHBORS = 100  # this project's default, not the authors' (their width is unspecified)


@dataclasses.dataclass(frozen=True)
class SelectPlan:
    """Everything the walk needs besides T and delta: a pytree (arrays) with static sizes.

    Arrays: `components` (W, d) unit walk directions (W a power of two; unused rows have budget
    0), `budgets` (W,) int32, `rank_abs` (W,) bool, `n_rows` () int32 real pool rows,
    `neighbors` () int32 neighbour-list width, `graph` (n_padded, K) int32 neighbour lists in
    graph mode (a dummy column otherwise). Static: `budget` (output length), `n_padded` (rows T
    is padded to), `capacity` and `bmax` (compiled buckets), `mode`.
    """

    components: jax.Array
    budgets: jax.Array
    rank_abs: jax.Array
    n_rows: jax.Array
    neighbors: jax.Array
    graph: jax.Array
    budget: int
    n_padded: int
    capacity: int
    bmax: int
    mode: str


jax.tree_util.register_dataclass(
    SelectPlan,
    data_fields=["components", "budgets", "rank_abs", "n_rows", "neighbors", "graph"],
    meta_fields=["budget", "n_padded", "capacity", "bmax", "mode"],
)


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """The host-side account of a plan: the PCA, and per walk its component, pole and budget."""

    knowledge: CoreKnowledge
    walk_component: np.ndarray  # (W,) the principal component each walk follows
    walk_pole: np.ndarray  # (W,) +1 / -1 for both-poles walks, 0 otherwise
    walk_weight: np.ndarray  # (W,) share of the budget
    walk_budget: np.ndarray  # (W,) rows
    conventions: dict[str, Any]


class WalkTrace(NamedTuple):
    """`select_kernel(..., with_steps=True)`: per output slot the row, its walk and step kind
    (-1 where unused), and how many rows were selected."""

    indices: jax.Array
    components: jax.Array
    steps: jax.Array
    count: jax.Array


# ---------------------------------------------------------------------------------------------
# Walk directions from the core knowledge.


def _canonical_sign(direction: np.ndarray) -> float:
    """+1 or -1 making the largest-magnitude coordinate positive (first on ties): a choice of one
    of {k, -k} that depends on the set only, used to order the two poles deterministically."""
    j = int(np.argmax(np.abs(direction)))
    return -1.0 if direction[j] < 0 else 1.0


def walk_directions(know: CoreKnowledge, sign_handling: str = "signed"):
    """The walks for a core knowledge: (directions (W, d), weights (W,), component (W,), pole (W,),
    rank_abs (W,)).

    "signed" and "absolute": one walk per component. "both-poles": two per component, +k and -k,
    with weights w_c·e+/(e+ + e-) and w_c·e-/(e+ + e-) where e± is the sum of squared positive /
    negative validation scores on k; the pole with more weight walks first (on a tie, the pole
    whose largest-magnitude coordinate is positive). Poles of zero weight are dropped. A
    component without spread (the single-row / constant-V case: the mean direction, whose sign
    is the data's) keeps one walk.
    """
    core.check_choice("sign_handling", sign_handling, SIGN_HANDLING)
    comps, weights = know.components, know.weights
    n_comp = comps.shape[0]
    if sign_handling != "both-poles":
        ones = np.zeros(n_comp, np.int64)
        return (comps, weights, np.arange(n_comp), ones,
                np.full(n_comp, sign_handling == "absolute"))
    dirs, wts, src, pole = [], [], [], []
    for c in range(n_comp):
        s = know.scores[:, c]
        pos, neg = float(np.sum(s[s > 0] ** 2)), float(np.sum(s[s < 0] ** 2))
        if pos + neg <= 0.0:
            dirs.append(comps[c]), wts.append(weights[c]), src.append(c), pole.append(0)
            continue
        canon = _canonical_sign(comps[c])
        k = comps[c] * canon  # the canonical pole; its validation energy:
        e_canon, e_other = (pos, neg) if canon > 0 else (neg, pos)
        order = [(k, e_canon, 1), (-k, e_other, -1)]
        if e_other > e_canon:
            order.reverse()
        for direction, energy, sign in order:
            if energy > 0:
                dirs.append(direction)
                wts.append(weights[c] * energy / (pos + neg))
                src.append(c)
                pole.append(sign)
    return (np.asarray(dirs), np.asarray(wts), np.asarray(src, np.int64),
            np.asarray(pole, np.int64), np.zeros(len(dirs), bool))


# ---------------------------------------------------------------------------------------------
# The host half.


def padded_count(n_rows: int, mesh: Mesh | None = None) -> int:
    """Rows T is padded to: whole `core.ROW_TILE` tiles (on every device of `mesh`)."""
    if mesh is None:
        return core.padded_rows(n_rows)
    return sharding.pad_rows(n_rows, core.ROW_TILE * mesh.size)


def plan_selection(
    train: Any,
    val: Any,
    *,
    ratio: float = 0.01,
    budget: int | None = None,
    pca_variance: float = 0.5,
    n_components: int | None = None,
    pca_sign: str = "v-based",
    val_normalize: str = "unit",
    sign_handling: str = "signed",
    neighbors: int = DEFAULT_NEIGHBORS,
    anchor_pool: int = 1000,
    mode: str = "onthefly",
    graph: Any = None,
    mesh: Mesh | None = None,
    checked: bool = False,
    prepared: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[SelectPlan, PlanInfo]:
    """`select_plan` and its host-side account (`PlanInfo`). With `checked=True` the arrays are
    taken as already checked by `core.as_features` (no second scan of T); `prepared` rows of T
    (`_host_rows`) are reused to build a graph in graph mode."""
    core.check_choice("mode", mode, walk.MODES)
    core.check_choice("pca_sign", pca_sign, core.PCA_SIGNS)
    core.check_choice("val_normalize", val_normalize, core.VAL_NORMALIZE)
    core.check_choice("sign_handling", sign_handling, SIGN_HANDLING)
    core.check_positive_int("anchor_pool", anchor_pool)
    if isinstance(neighbors, bool) or int(neighbors) != neighbors or neighbors < 0:
        raise G2ISError(f"neighbors must be 0 (every row) or a positive integer, got "
                        f"{neighbors}", param="neighbors")
    t = train if checked else core.as_features(train, "train features")
    v = val if checked else core.as_features(val, "validation features")
    core.check_dims(t, v)
    n_rows, dim = t.shape
    total = core.total_budget(n_rows, ratio) if budget is None else core.check_budget(
        budget, n_rows)
    know = core.core_knowledge(v, pca_variance=pca_variance, n_components=n_components,
                               pca_sign=pca_sign, val_normalize=val_normalize)
    dirs, weights, src, pole, rank_abs = walk_directions(know, sign_handling)
    budgets = core.allocate_budgets(total, weights)
    acc = core.acc_dtype(t.dtype)
    n_padded = padded_count(n_rows, mesh)
    neighbor_idx = None
    if mode == "graph":
        from g2is_jax.select import graph as graph_lib

        if graph is None:
            unit = (prepared or _host_rows(t, n_padded, mesh))[0]
            graph = graph_lib.knn_graph(unit, neighbors or n_rows, n_rows=n_rows)
            del unit
        neighbor_idx = graph_lib.neighbor_indices(graph, n_rows)
    arrays, static = walk.walk_arrays(dirs, budgets, n_rows=n_rows, n_padded=n_padded, acc=acc,
                                      neighbors=neighbors, mode=mode, graph=neighbor_idx,
                                      rank_abs=rank_abs)
    if mesh is None:
        placed = {k: jnp.asarray(x) for k, x in arrays.items()}
    else:
        graph_rows = arrays.pop("graph")
        placed = sharding.place(arrays, sharding.replicated(mesh))
        placed["graph"] = sharding.place_rows(graph_rows, mesh, n_padded)
    plan = SelectPlan(**placed, budget=total, n_padded=n_padded, mode=mode, **static)
    conventions = {
        "pca_sign": pca_sign,
        "val_normalize": val_normalize,
        "sign_handling": sign_handling,
        "neighbors": int(neighbors),
        "neighbors_meaning": "0 = the full sorted list; 100 is this project's default",
        "pca_variance": None if n_components is not None else float(pca_variance),
        "n_components": n_components,
        "components_kept": int(know.components.shape[0]),
        "anchor_pool": int(anchor_pool),
        "mode": mode,
    }
    info = PlanInfo(know, src, pole, weights, budgets, conventions)
    return plan, info


def select_plan(train: Any, val: Any, **options: Any) -> SelectPlan:
    """The host half of a G2IS selection (module docstring); options as `g2is_select`'s."""
    return plan_selection(train, val, **options)[0]


def pad_to_plan(train: Any, plan: SelectPlan) -> jax.Array:
    """T with zero rows up to the plan's padded row count (never selected)."""
    n = train.shape[0]
    if n > plan.n_padded:
        raise G2ISError(f"T has {n} rows but the plan was made for at most {plan.n_padded}; "
                        "make the plan from this T", param="train")
    x = jnp.asarray(train)
    return x if n == plan.n_padded else jnp.pad(x, ((0, plan.n_padded - n), (0, 0)))


# ---------------------------------------------------------------------------------------------
# The device half.


def select_kernel(train: Any, plan: SelectPlan, delta: Any, *, mesh: Mesh | None = None,
                  with_steps: bool = False) -> Any:
    """The gradient walk of `plan` over pool features `train` at consistency threshold `delta`.

    Pure: composes under `jax.jit` (`mesh` and `with_steps` static), `jax.vmap` (over delta,
    over plans, ...) and inside other jitted programs. `train` holds the plan's pool rows: raw
    features (normalised here), optionally padded up to `plan.n_padded` rows, or the pair
    (unit rows, squared norms) from `core.prepare_rows` / `walk.prepare_sharded_rows` (what
    `g2is_select` passes: the device then holds T once). Returns
    int32[plan.budget]: the selected rows in order, -1 where a component ended short; with
    `with_steps`, a `WalkTrace`. A Python-number `delta` is checked to lie in (0, 1]; a traced
    one is the caller's to check.
    """
    if isinstance(delta, (int, float, np.floating, np.integer)):
        core.check_fraction("delta", delta)
    if isinstance(train, tuple):
        unit, sq = train
        if unit.shape[0] != plan.n_padded:
            raise G2ISError(f"prepared rows have {unit.shape[0]} rows but the plan pads to "
                            f"{plan.n_padded}; prepare them for this plan", param="train")
    else:
        unit, sq = core.normalise_rows(pad_to_plan(train, plan))
    acc = sq.dtype
    idx, comp, step, count = walk.walk_kernel(
        unit, sq, plan.components.astype(acc), plan.budgets, plan.n_rows,
        jnp.asarray(delta, acc), plan.neighbors, plan.graph, plan.rank_abs,
        capacity=plan.capacity, mode=plan.mode, bmax=plan.bmax, mesh=mesh)
    if not with_steps:
        return idx[: plan.budget]
    b = plan.budget
    return WalkTrace(idx[:b], comp[:b], step[:b], count)


_host_kernel = jax.jit(select_kernel, static_argnames=("mesh", "with_steps"))


def _host_rows(t: Any, n_padded: int, mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """Prepared rows: host-padded, one transfer, the copy reused for the unit rows
    (`core.prepare_rows`), or split over the mesh."""
    unit, sq = core.prepare_rows(t) if mesh is None else walk.prepare_sharded_rows(t, mesh)
    if unit.shape[0] != n_padded:  # pragma: no cover - both pad by the same rule
        raise AssertionError("row padding of the plan and of the rows disagree")
    return unit, sq


def g2is_select(
    train: Any,
    val: Any,
    *,
    ratio: float = 0.01,
    delta: float = 0.8,
    pca_variance: float = 0.5,
    n_components: int | None = None,
    pca_sign: str = "v-based",
    val_normalize: str = "unit",
    sign_handling: str = "signed",
    neighbors: int = DEFAULT_NEIGHBORS,
    anchor_pool: int = 1000,
    mode: str = "onthefly",
    graph: Any = None,
    budget: int | None = None,
    mesh: Mesh | None = None,
    method: str | None = None,
    diagnostics: bool = False,
    diagnostics_sample: int = 512,
) -> SelectionResult:
    """G2IS selection from pool features `train` (N×d) and target features `val` (n×d).

    1. Rows of `train` normalised (norm floor 1e-10). 2. Core knowledge: PCA of `val`
    (`core.core_knowledge`, conventions `pca_sign` and `val_normalize`). 3. Budget int(N·ratio)
    (or `budget`) split over the walks by largest remainder (`sign_handling`, module docstring).
    4. The walk (walk.py). `anchor_pool` is accepted for parity with the release; with ties
    broken by index it cannot change the anchor (see walk.py). In graph mode `graph` is a
    `graph.KnnGraph` or an (N×W) index array; without one it is built here. Dtype is kept:
    float32, bfloat16 storage (float32 arithmetic), float64 under x64. `mesh` splits T's rows
    over the mesh's devices; the selection is the same. `method` names the result (default:
    "g2is", "g2is-robust" or "g2is-abs" by `sign_handling`). `diagnostics` adds the pool and
    walk diagnostics (diagnostics.py; one more matrix-vector product per selected row; not on a
    mesh).
    """
    core.check_fraction("delta", delta)
    t = core.as_features(train, "train features")
    v = core.as_features(val, "validation features")
    core.check_dims(t, v)
    rows = _host_rows(t, padded_count(t.shape[0], mesh), mesh)
    plan, info = plan_selection(
        t, v, ratio=ratio, budget=budget, pca_variance=pca_variance, n_components=n_components,
        pca_sign=pca_sign, val_normalize=val_normalize, sign_handling=sign_handling,
        neighbors=neighbors, anchor_pool=anchor_pool, mode=mode, graph=graph, mesh=mesh,
        checked=True, prepared=rows)
    trace = _host_kernel(rows, plan, float(delta), mesh=mesh, with_steps=True)
    del rows
    k = int(sharding.to_host(trace.count))
    host = {name: sharding.to_host(x)[:k] for name, x in
            (("indices", trace.indices), ("components", trace.components),
             ("steps", trace.steps))}
    name = method or {"signed": "g2is", "both-poles": "g2is-robust",
                      "absolute": "g2is-abs"}[sign_handling]
    result = make_result(host["indices"], host["components"], host["steps"], info,
                         method=name, budget=plan.budget, delta=float(delta))
    if diagnostics:
        if mesh is not None:
            return dataclasses.replace(result, diagnostics={"skipped": "not computed on a mesh"})
        from g2is_jax.select.diagnostics import diagnose

        result = diagnose(result, t, plan, sample=diagnostics_sample)
    return result


def make_result(indices: np.ndarray, walks: np.ndarray, steps: np.ndarray, info: PlanInfo, *,
                method: str, budget: int, delta: float) -> SelectionResult:
    """The result object of a walk's output (host arrays trimmed to the selected rows)."""
    per = []
    evr = info.knowledge.explained_variance_ratio
    for w, b in enumerate(info.walk_budget):
        mine = walks == w
        per.append(ComponentSummary(
            component=int(info.walk_component[w]),
            pole=int(info.walk_pole[w]),
            explained_variance_ratio=float(evr[info.walk_component[w]]),
            weight=float(info.walk_weight[w]),
            budget=int(b),
            selected=int(mine.sum()),
            neighbor_steps=int((mine & (steps == STEP_NEIGHBOR)).sum()),
            fallback_steps=int((mine & (steps == STEP_FALLBACK)).sum()),
        ))
    return SelectionResult(
        indices=np.asarray(indices, np.int64),
        components=np.asarray(walks, np.int64),
        steps=np.asarray(steps, np.int64),
        per_component=tuple(per),
        method=method,
        budget=int(budget),
        conventions={**info.conventions, "delta": delta},
    )


__all__ = ["SIGN_HANDLING", "PlanInfo", "SelectPlan", "WalkTrace", "g2is_select",
           "make_result", "pad_to_plan", "plan_selection", "select_kernel", "select_plan",
           "walk_directions"]
