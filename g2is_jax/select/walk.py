"""The gradient walk: one compiled `lax.while_loop`, no host round trip per selected row.

Semantics (those of the authors' release, see `plan.g2is_select`): for each walk direction k
with a budget, an anchor (the unselected row most similar to k), then rows added one at a time.
A candidate must be unselected, in no conflict with this component's rows (no negative dot) and
keep consistency (|cos(s + t, k)| >= delta * |cos(s, k)|, s the running sum). The first valid row
of the last row's neighbour list is taken; failing that, the first valid row by similarity to k;
failing that, the component ends short.

Every loop iteration either starts a component or adds one row, so the state is a fixed set of
arrays and the loop compiles once per shape bucket (rows padded to 128, output and component
counts rounded to powers of two). Two ways to get neighbours:

* ``"onthefly"`` (default, no graph at all): each added row t costs one matrix-vector product
  x = T·t over all rows, which updates per-row running quantities: the minimum dot with the
  component's rows (conflict) and the dot with s (for ‖s + t_c‖² = ‖s‖² + ‖t_c‖² + 2 s·t_c). The
  neighbour list of t is the top-`neighbors` of that same x, so "first valid neighbour" is the
  valid row with the largest x when fewer than `neighbors` rows come before it, an O(N) count,
  no sort. Cost O(N·d) per row; memory O(N·d + N).
* ``"graph"``: a precomputed kNN graph (`graph.knn_graph`) gives the candidates; only their dots
  with the component's rows are computed (O(neighbors·budget·d) per row). The fallback scans rows
  in similarity order in chunks of `_CHUNK`, re-checking constraints lazily as the reference does.

The default is "onthefly": it needs no O(N²·d) graph build, which dominates graph mode's cost
(measured by scripts/bench_select.py; the numbers are in the README's Performance section).

Sharded (``mesh=`` from `g2is_jax.sharding.make_mesh`): T is padded with zero rows to whole
row tiles on every device and split by rows over all of the mesh's devices; the same jitted loop
then runs as one SPMD program: each matrix-vector product, per-row update and masked max /
first-index is computed on each device's rows and combined by small all-reduces, and the row
t_last is fetched by an all-reduce of one row. Padding rows start out "taken" and are never
counted as neighbours, so the selection is the one device's, index for index (tested at 4 and 8
devices and across two processes).

Ties: every order is "value descending, then index ascending" (lax.top_k and a masked
max/first-index pair both give it); -0.0 is folded into +0.0 so sorts and comparisons agree.

Consistency is tested with a relative slack of `_COS_RTOL_ULPS` units of roundoff: candidates
whose new cosine equals delta·old in exact arithmetic (duplicate rows at delta = 1, zero rows)
then pass whatever the summation order; the NumPy reference in the tests applies the same slack.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from g2is_jax import sharding
from g2is_jax.errors import G2ISError
from g2is_jax.select import core
from g2is_jax.select.core import STEP_ANCHOR, STEP_FALLBACK, STEP_NEIGHBOR
from g2is_jax.vocab import WALK_MODES, WalkMode

Mode = WalkMode
MODES = WALK_MODES
_COS_RTOL_ULPS = 64
_CHUNK = 128  # fallback scan width in graph mode; divides the padded row count
_HIGHEST = lax.Precision.HIGHEST

class WalkOutput(NamedTuple):
    """Selected rows in order (int32), the component that chose each, and how (step kind)."""

    indices: np.ndarray
    components: np.ndarray
    steps: np.ndarray


# ---------------------------------------------------------------------------------------------
# Small array helpers (all O(N) or less).


def _canon(x: jax.Array) -> jax.Array:
    """Fold -0.0 into +0.0 so that total-order sorts and == comparisons agree on ties."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def _first_max(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Index of the largest value among `mask`, lowest index on ties; len(values) if none."""
    n = values.shape[0]
    best = jnp.max(jnp.where(mask, values, -jnp.inf))
    iota = jnp.arange(n, dtype=jnp.int32)
    return jnp.min(jnp.where(mask & (values == best), iota, n)).astype(jnp.int32)


def _abs_cos(num: jax.Array, sq_norm: jax.Array) -> jax.Array:
    """|num| / sqrt(sq_norm), and 0 where the norm is at most the floor (as the release does)."""
    norm = jnp.sqrt(jnp.maximum(sq_norm, 0))
    return jnp.where(norm > core.NORM_FLOOR, jnp.abs(num) / jnp.where(norm > 0, norm, 1), 0)


def _consistent(new: jax.Array, old: jax.Array, delta: jax.Array) -> jax.Array:
    rtol = _COS_RTOL_ULPS * jnp.finfo(old.dtype).eps
    return new >= delta * old * (1 - rtol)


def _matvec(t: jax.Array, v: jax.Array, acc: Any) -> jax.Array:
    """T·v accumulated in `acc`; v in T's dtype is exact, otherwise split for full precision."""
    if v.dtype == t.dtype:
        return jnp.dot(t, v, precision=_HIGHEST, preferred_element_type=acc)
    # bfloat16 storage, float32 v: v = hi + mid + lo, each exactly representable in T's dtype.
    out = jnp.zeros(t.shape[0], acc)
    rest = v.astype(acc)
    for _ in range(3):
        part = rest.astype(t.dtype)
        out = out + jnp.dot(t, part, precision=_HIGHEST, preferred_element_type=acc)
        rest = rest - part.astype(acc)
    return out


# ---------------------------------------------------------------------------------------------
# The loop state.


class _Carry(NamedTuple):
    taken: jax.Array  # (Np,) bool: selected by some component, or a padding row
    out_idx: jax.Array  # (cap,) int32, -1 where unused
    out_comp: jax.Array  # (cap,) int32
    out_step: jax.Array  # (cap,) int8
    pos: jax.Array  # () rows selected so far
    comp: jax.Array  # () current component; C when finished
    count: jax.Array  # () rows in the current component; 0 means "needs an anchor"
    last: jax.Array  # () row added last
    done: jax.Array  # () no unselected row left anywhere
    sims: jax.Array  # (Np,) T·k of the current component
    sk: jax.Array  # () s·k
    ss: jax.Array  # () ‖s‖²
    mode: Any  # mode-specific arrays (see _OnTheFly / _GraphState)


class _OnTheFly(NamedTuple):
    min_dot: jax.Array  # (Np,) min over the component's rows j of T·t_j (+inf before any)
    dot_s: jax.Array  # (Np,) T·s


class _GraphState(NamedTuple):
    s_vec: jax.Array  # (d,) s
    s_rows: jax.Array  # (bmax, d) the component's rows; unused rows are 0 (a 0 dot: no conflict)
    order: jax.Array  # (Np,) rows by T·k descending, index ascending; padding last


def _next_comp(budgets: jax.Array, start: jax.Array) -> jax.Array:
    c = budgets.shape[0]
    iota = jnp.arange(c, dtype=jnp.int32)
    return jnp.min(jnp.where((iota >= start) & (budgets > 0), iota, c)).astype(jnp.int32)


def _record(carry: _Carry, row: jax.Array, step: Any, found: jax.Array) -> _Carry:
    """Append `row` to the output when `found` (an out-of-range write is dropped otherwise)."""
    cap = carry.out_idx.shape[0]
    slot = jnp.where(found, carry.pos, cap)
    return carry._replace(
        taken=carry.taken.at[jnp.where(found, row, carry.taken.shape[0])].set(True, mode="drop"),
        out_idx=carry.out_idx.at[slot].set(row, mode="drop"),
        out_comp=carry.out_comp.at[slot].set(carry.comp, mode="drop"),
        out_step=carry.out_step.at[slot].set(jnp.asarray(step, jnp.int8), mode="drop"),
        pos=carry.pos + found.astype(jnp.int32),
    )


def _accept(
    carry: _Carry, row: jax.Array, found: jax.Array, near: jax.Array, new_sq: jax.Array, budgets,
    take=lambda x, i: x[i],
) -> _Carry:
    """A walk step's outcome: add `row` (a neighbour if `near`, else a fallback) when found."""
    safe = jnp.where(found, row, 0)
    carry = _record(carry, safe, jnp.where(near, STEP_NEIGHBOR, STEP_FALLBACK), found)
    carry = carry._replace(
        last=jnp.where(found, safe, carry.last),
        sk=jnp.where(found, carry.sk + take(carry.sims, safe), carry.sk),
        ss=jnp.where(found, new_sq, carry.ss),
    )
    return _advance(carry, budgets, found)


def _advance(carry: _Carry, budgets: jax.Array, found: jax.Array) -> _Carry:
    """After a step: count the row, and move to the next component when full or stuck."""
    count = jnp.where(found, carry.count + 1, carry.count)
    finished = (~found) | (count >= budgets[carry.comp])
    return carry._replace(
        count=jnp.where(finished, 0, count),
        comp=jnp.where(finished, _next_comp(budgets, carry.comp + 1), carry.comp),
    )


# ---------------------------------------------------------------------------------------------
# One compiled walk for both modes.


def _row_taker(mesh: Mesh | None):
    """``take(x, i) = x[i]`` for a replicated scalar index i. On a mesh, x row-sharded: each device
    reads the row if it holds it, zeros otherwise, and a sum over devices delivers it (exactly:
    one term is the row, the rest are zeros). GSPMD would instead all-gather x for a dynamic
    index, i.e. move all of T every step."""
    if mesh is None:
        return lambda x, i: x[i]
    axes = sharding.AXES
    rows = P(axes)

    def local(x, i):
        n_local = x.shape[0]
        j = i - lax.axis_index(axes) * n_local
        mine = (j >= 0) & (j < n_local)
        v = lax.dynamic_index_in_dim(x, jnp.clip(j, 0, n_local - 1), keepdims=False)
        return lax.psum(jnp.where(mine, v, jnp.zeros_like(v)), axes)

    def take(x, i):
        return jax.shard_map(local, mesh=mesh, in_specs=(rows, P()), out_specs=P())(x, i)

    return take


def _walk_impl(
    t: jax.Array,
    sq: jax.Array,
    comps: jax.Array,
    budgets: jax.Array,
    n_rows: jax.Array,
    delta: jax.Array,
    neighbors: jax.Array,
    graph: jax.Array,
    rank_abs: jax.Array | None = None,
    *,
    capacity: int,
    mode: str,
    bmax: int,
    mesh: Mesh | None = None,
):
    """The walk over prepared rows (module docstring). `rank_abs[c]` ranks component c's anchor
    and fallback candidates by |T·k| instead of T·k (sign-free); None means False for all.
    Returns (indices, components, steps) of length `capacity` (-1 where unused) and the count."""
    take = _row_taker(mesh)
    npad, d = t.shape
    acc = sq.dtype
    iota = jnp.arange(npad, dtype=jnp.int32)
    real = iota < n_rows
    delta = delta.astype(acc)
    if rank_abs is None:
        rank_abs = jnp.zeros(comps.shape[0], bool)

    def rank(carry: _Carry) -> jax.Array:
        """What anchors and fallbacks maximise: T·k, or |T·k| for a sign-free component."""
        return jnp.where(rank_abs[carry.comp], jnp.abs(carry.sims), carry.sims)

    def start(carry: _Carry) -> _Carry:
        # New component: similarities to k, then the anchor, the unselected row most similar to k.
        # (The release first scans the `anchor_pool` most similar rows and then all rows; both
        # stages together pick exactly this row.)
        sims = _canon(_matvec(t, comps[carry.comp], acc))
        carry = carry._replace(sims=sims)
        ranked = rank(carry)
        anchor = _first_max(ranked, ~carry.taken)
        found = anchor < npad
        row = jnp.where(found, anchor, 0)
        carry = _record(carry, anchor, STEP_ANCHOR, found)
        carry = carry._replace(
            last=row, done=~found, sk=take(sims, row), ss=take(sq, row),
            mode=_start_mode(carry, ranked, row),
        )
        return _advance(carry, budgets, found)

    def _start_mode(carry: _Carry, ranked: jax.Array, row: jax.Array):
        if mode == "onthefly":
            return _OnTheFly(jnp.full((npad,), jnp.inf, acc), jnp.zeros((npad,), acc))
        key = jnp.where(real, _canon(-ranked), jnp.inf)
        order = jnp.argsort(key, stable=True).astype(jnp.int32)
        s_rows = jnp.zeros((bmax, d), t.dtype).at[0].set(t[row])
        return _GraphState(t[row].astype(acc), s_rows, order)

    def step_onthefly(carry: _Carry) -> _Carry:
        x = _canon(_matvec(t, take(t, carry.last), acc))  # the last row's similarity row
        st = carry.mode
        min_dot = jnp.minimum(st.min_dot, x)
        dot_s = st.dot_s + x
        old = _abs_cos(carry.sk, carry.ss)
        new_sq = carry.ss + sq + 2 * dot_s
        new = _abs_cos(carry.sk + carry.sims, new_sq)
        valid = (~carry.taken) & (min_dot >= 0) & _consistent(new, old, delta)
        # First valid neighbour: the valid row with the largest x, if fewer than `neighbors` real
        # rows precede it in the (x descending, index ascending) order.
        c1 = _first_max(x, valid)
        c1s = jnp.minimum(c1, npad - 1)
        x_c1 = take(x, c1s)
        ahead = real & ((x > x_c1) | ((x == x_c1) & (iota < c1)))
        near = (c1 < npad) & (jnp.sum(ahead) < neighbors)
        row = jnp.where(near, c1, _first_max(rank(carry), valid))  # else the fallback
        found = row < npad
        carry = carry._replace(mode=_OnTheFly(min_dot, dot_s))
        new_sq_row = take(new_sq, jnp.minimum(row, npad - 1))
        return _accept(carry, row, found, near, new_sq_row, budgets, take)

    def check(carry: _Carry, cands: jax.Array, usable: jax.Array):
        """Validity of a few candidate rows from their dots with the component's rows."""
        st = carry.mode
        cand_rows = t[cands]
        dots = jnp.dot(cand_rows, st.s_rows.T, precision=_HIGHEST, preferred_element_type=acc)
        no_conflict = jnp.all(dots >= 0, axis=1)
        dot_s = jnp.dot(cand_rows.astype(acc), st.s_vec, precision=_HIGHEST)
        new_sq = carry.ss + sq[cands] + 2 * dot_s
        new = _abs_cos(carry.sk + carry.sims[cands], new_sq)
        old = _abs_cos(carry.sk, carry.ss)
        valid = usable & (~carry.taken[cands]) & no_conflict & _consistent(new, old, delta)
        first = jnp.argmax(valid)
        return valid[first], cands[first], new_sq[first]

    def step_graph(carry: _Carry) -> _Carry:
        width = graph.shape[1]
        usable = jnp.arange(width) < jnp.minimum(neighbors, n_rows)
        near, row_nb, sq_nb = check(carry, graph[carry.last], usable)

        def scan(_):
            def cond(s):
                return (~s[0]) & (s[3] < npad)

            def body(s):
                cands = lax.dynamic_slice_in_dim(carry.mode.order, s[3], _CHUNK)
                ok, row, nsq = check(carry, cands, jnp.ones((_CHUNK,), bool))
                return ok, row, nsq, s[3] + _CHUNK

            init = (jnp.array(False), jnp.int32(0), jnp.zeros((), acc), jnp.int32(0))
            ok, row, nsq, _ = lax.while_loop(cond, body, init)
            return ok, row, nsq

        found, row, new_sq = lax.cond(near, lambda _: (near, row_nb, sq_nb), scan, None)
        st, added = carry.mode, t[row]
        # The new row goes to slot `count` of the component's rows (the anchor is slot 0).
        s_rows = lax.dynamic_update_slice_in_dim(st.s_rows, added[None, :], carry.count, 0)
        carry = carry._replace(
            mode=_GraphState(
                jnp.where(found, st.s_vec + added.astype(acc), st.s_vec),
                jnp.where(found, s_rows, st.s_rows),
                st.order,
            )
        )
        return _accept(carry, row, found, near, new_sq, budgets, take)

    step = step_onthefly if mode == "onthefly" else step_graph
    if mode == "onthefly":
        init_mode: Any = _OnTheFly(jnp.zeros((npad,), acc), jnp.zeros((npad,), acc))
    else:
        init_mode = _GraphState(
            jnp.zeros((d,), acc), jnp.zeros((bmax, d), t.dtype), jnp.zeros((npad,), jnp.int32)
        )
    carry = _Carry(
        taken=~real,
        out_idx=jnp.full((capacity,), -1, jnp.int32),
        out_comp=jnp.full((capacity,), -1, jnp.int32),
        out_step=jnp.full((capacity,), -1, jnp.int8),
        pos=jnp.int32(0),
        comp=_next_comp(budgets, jnp.int32(0)),
        count=jnp.int32(0),
        last=jnp.int32(0),
        done=jnp.array(False),
        sims=jnp.zeros((npad,), acc),
        sk=jnp.zeros((), acc),
        ss=jnp.zeros((), acc),
        mode=init_mode,
    )
    n_comp = comps.shape[0]
    carry = lax.while_loop(
        lambda c: (~c.done) & (c.comp < n_comp),
        lambda c: lax.cond(c.count == 0, start, step, c),
        carry,
    )
    return carry.out_idx, carry.out_comp, carry.out_step, carry.pos


def walk_arrays(
    components: Any,
    budgets: Any,
    *,
    n_rows: int,
    n_padded: int,
    acc: Any,
    neighbors: int,
    mode: str,
    graph: Any = None,
    rank_abs: Any = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The walk's small inputs as host arrays, padded to static buckets, and its static sizes.

    Components (C×d) and budgets (C,) are padded to a power-of-two count (zero budgets are
    skipped), the graph's rows to `n_padded` and its columns to a power of two, so that nearby
    problems share one compiled program. `neighbors=0` means the full sorted list (every row).
    Returns (arrays, static) with arrays components, budgets, rank_abs, n_rows, neighbors,
    graph and static capacity, bmax.
    """
    d = np.shape(components)[1]
    comps = np.asarray(components, dtype=np.float64)
    chex.assert_shape(comps, (None, d))
    budgets = np.asarray(budgets, dtype=np.int64)
    chex.assert_shape(budgets, (comps.shape[0],))
    core.check_choice("mode", mode, MODES)
    if isinstance(neighbors, bool) or int(neighbors) != neighbors or neighbors < 0:
        raise G2ISError(f"neighbors must be 0 (every row) or a positive integer, got "
                        f"{neighbors}", param="neighbors")
    width_wanted = n_rows if neighbors == 0 else min(int(neighbors), n_rows)
    total = int(budgets.sum())
    if total > n_rows:
        raise G2ISError(f"budget {total} is larger than the pool ({n_rows} rows); lower it",
                        param="budget")
    n_comp = core.bucket(comps.shape[0], 8)
    comps_p = np.zeros((n_comp, d), acc)
    comps_p[: comps.shape[0]] = comps
    budgets_p = np.zeros(n_comp, np.int32)
    budgets_p[: budgets.shape[0]] = budgets
    abs_p = np.zeros(n_comp, bool)
    if rank_abs is not None:
        abs_p[: comps.shape[0]] = np.asarray(rank_abs, bool)
    if mode == "graph":
        if graph is None:
            raise G2ISError("graph mode needs a neighbour graph; build one with `g2is graph`",
                            param="graph")
        graph = np.asarray(graph, np.int32)
        if graph.ndim != 2 or graph.shape[0] < n_rows:
            raise G2ISError(
                f"the graph has {graph.shape[0]} rows for {n_rows} features; rebuild it "
                "from these features with `g2is graph`", param="graph"
            )
        if graph.shape[1] < width_wanted:
            raise G2ISError(
                f"the graph keeps {graph.shape[1]} neighbours per row, fewer than neighbors="
                f"{neighbors or 'all'}; rebuild it with that many neighbours or lower neighbors",
                param="neighbors"
            )
        # Rows padded to the row tile, columns to a power of two (one program for nearby
        # widths); padded columns lie beyond min(neighbors, n_rows) and are never read.
        width = core.bucket(graph.shape[1])
        graph = np.pad(graph[:n_rows], ((0, n_padded - n_rows), (0, width - graph.shape[1])))
        bmax = core.bucket(int(budgets.max(initial=1)), 64)
    else:
        graph = np.zeros((n_padded, 1), np.int32)
        bmax = 1
    arrays = {
        "components": comps_p,
        "budgets": budgets_p,
        "rank_abs": abs_p,
        "n_rows": np.int32(n_rows),
        "neighbors": np.int32(width_wanted),
        "graph": graph,
    }
    return arrays, {"capacity": core.bucket(total, 64), "bmax": bmax}


def gradient_walk(
    unit_rows: jax.Array,
    sq_norms: jax.Array,
    components: Any,
    budgets: Any,
    *,
    n_rows: int,
    delta: float = 0.8,
    neighbors: int = 100,
    mode: Mode = "onthefly",
    graph: Any = None,
    rank_abs: Any = None,
    mesh: Mesh | None = None,
) -> WalkOutput:
    """Run the walk on prepared rows (`core.prepare_rows`) and unit components (C×d); host side.

    `budgets` (C,) are the rows per component (zeros are skipped); `n_rows` the real rows before
    padding. In graph mode `graph` is the (N×W) neighbour index array, rows sorted by similarity.
    With `mesh`, pass rows from `prepare_sharded_rows`. Returns the selection trimmed to the rows
    actually chosen. For a function that composes under jit and vmap, use
    `select_plan` + `select_kernel` (plan.py).
    """
    npad = unit_rows.shape[0]
    acc = core.acc_dtype(unit_rows.dtype)
    arrays, static = walk_arrays(components, budgets, n_rows=n_rows, n_padded=npad, acc=acc,
                                 neighbors=neighbors, mode=mode, graph=graph, rank_abs=rank_abs)
    small = (arrays["components"], arrays["budgets"], arrays["n_rows"],
             np.asarray(delta, acc), arrays["neighbors"])
    graph = arrays["graph"]
    if mesh is None:
        small, graph = tuple(jnp.asarray(x) for x in small), jnp.asarray(graph)
        abs_arr = jnp.asarray(arrays["rank_abs"])
    else:
        if npad % (core.ROW_TILE * mesh.size):
            raise ValueError("sharded rows must come from prepare_sharded_rows")
        small, abs_arr = sharding.place((small, arrays["rank_abs"]), sharding.replicated(mesh))
        graph = sharding.place_rows(graph, mesh, npad)
    idx, comp, step, count = _walk(unit_rows, sq_norms, *small, graph, abs_arr, mode=mode,
                                   mesh=mesh, **static)
    host = sharding.to_host
    k = int(host(count))
    return WalkOutput(host(idx)[:k], host(comp)[:k], host(step)[:k])


# The compiled walk: what `plan.select_kernel` calls (jitted, so eager calls of the kernel
# compile once per shape bucket; nested inside a user's jit it is inlined).
WALK_STATIC = ("capacity", "mode", "bmax", "mesh")
walk_kernel = _walk = jax.jit(_walk_impl, static_argnames=WALK_STATIC)


def prepare_sharded_rows(x: Any, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """`core.prepare_rows` for a mesh: zero rows up to whole `core.ROW_TILE` tiles on every
    device, rows split over all devices (each process reads only its own rows of `x`)."""
    npad = sharding.pad_rows(x.shape[0], core.ROW_TILE * mesh.size)
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        x = np.asarray(x)
    return core.prepare_rows(sharding.place_rows(x, mesh, npad))
