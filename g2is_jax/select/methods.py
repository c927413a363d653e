"""The one registry of selection methods, used by `g2is select`, `g2is run` and the Python API.

A method maps `SelectionInputs` (one pool and one validation feature array per warm-up
checkpoint, the checkpoints' weights, optional subtask names, an optional prebuilt graph and
device mesh) and `SelectOptions` (every option of every method, typed, with defaults) to a
`SelectionResult`. `METHODS[name].options` lists the options a method reads; the others are
ignored by it and left out of what it records.

Methods:

* ``g2is``: the authors' gradient walk (sign of each component by `pca_sign`).
* ``g2is-robust``: this project's sign-robust walk, both poles of every component
  (`plan.walk_directions`, "both-poles"); its selection does not depend on `pca_sign`.
* ``g2is-abs``: this project's other sign-free variant: one walk per component, anchor and
  fallback rows ranked by |T·k| ("absolute").
* ``less``: LESS's top-k by lr-weighted mean cosine, max over subtasks.
* ``random``: a seeded uniform sample.
* ``rds``: LESS's scoring on representation (hidden-state) features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from g2is_jax.errors import G2ISError
from g2is_jax.select import baselines, core, diagnostics, plan, walk
from g2is_jax.select.core import SelectionResult
from g2is_jax.select.features import combine_checkpoints, remove_mean_direction
from g2is_jax.vocab import (
    METHOD_HELP,
    METHOD_NAMES,
    POOL_MEAN,
    STORAGE_DTYPES,
    MethodName,
    PoolMean,
    StorageDtype,
)


@dataclasses.dataclass(frozen=True)
class SelectOptions:
    """Every selection option, typed and with its default; each method reads its own."""

    ratio: float = 0.01
    budget: int | None = None
    delta: float = 0.8
    pca_variance: float = 0.5
    n_components: int | None = None
    pca_sign: core.PcaSign = "v-based"
    val_normalize: core.ValNormalize = "unit"
    pool_mean: PoolMean = "keep"
    neighbors: int = plan.DEFAULT_NEIGHBORS
    anchor_pool: int = 1000
    mode: walk.Mode = "onthefly"
    dtype: StorageDtype = "auto"
    seed: int = 0
    diagnostics: bool = True
    diagnostics_sample: int = 512

    def __post_init__(self):
        core.check_choice("pca_sign", self.pca_sign, core.PCA_SIGNS)
        core.check_choice("val_normalize", self.val_normalize, core.VAL_NORMALIZE)
        core.check_choice("pool_mean", self.pool_mean, POOL_MEAN)
        core.check_choice("mode", self.mode, walk.MODES)
        core.check_choice("dtype", self.dtype, STORAGE_DTYPES)
        core.check_fraction("ratio", self.ratio)
        core.check_fraction("delta", self.delta)
        if self.n_components is None:
            core.check_fraction("pca_variance", self.pca_variance, closed_high=False)
        else:
            core.check_positive_int("n_components", self.n_components)
        if self.budget is not None:
            core.check_positive_int("budget", self.budget)
        if isinstance(self.neighbors, bool) or self.neighbors < 0:
            raise G2ISError(f"neighbors must be 0 (every row) or a positive integer, got "
                            f"{self.neighbors}", param="neighbors")
        core.check_positive_int("anchor_pool", self.anchor_pool)
        core.check_positive_int("diagnostics_sample", self.diagnostics_sample)


@dataclasses.dataclass(frozen=True)
class SelectionInputs:
    """Features of one pool and one target: per checkpoint a pool (N×d) and validation (n×d)
    array, the checkpoints' weights (summing to 1), optional validation subtask names."""

    train: Sequence[Any]
    val: Sequence[Any]
    weights: np.ndarray | None = None
    subtasks: Sequence[str] | None = None
    graph: Any = None
    mesh: Any = None

    def __post_init__(self):
        if not self.train or len(self.train) != len(self.val):
            raise G2ISError(
                f"{len(self.train)} pool and {len(self.val)} validation feature sets; give one "
                "of each per checkpoint, in the same order", param="train")
        if self.weights is None:
            object.__setattr__(self, "weights", np.full(len(self.train), 1 / len(self.train)))

    @property
    def n_rows(self) -> int:
        return int(self.train[0].shape[0])


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    options: tuple[str, ...]
    run: Callable[[SelectionInputs, SelectOptions], SelectionResult]


_WALK_OPTIONS = ("ratio", "budget", "delta", "pca_variance", "n_components", "pca_sign",
                 "val_normalize", "pool_mean", "neighbors", "anchor_pool", "mode", "dtype",
                 "diagnostics")


def _storage(array: Any, dtype: str) -> Any:
    import jax

    if dtype == "auto":
        return array
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise G2ISError("dtype float64 needs JAX's x64 mode: set JAX_ENABLE_X64=1",
                        param="dtype")
    if dtype == "bfloat16":
        import jax.numpy as jnp

        return jnp.asarray(np.asarray(array, np.float32), jnp.bfloat16)
    return np.asarray(array, dtype)


def walk_inputs(inputs: SelectionInputs, val_normalize: str = "unit",
                pool_mean: str = "keep") -> tuple[Any, Any, dict[str, Any]]:
    """(T, V, conventions) for the walk: the checkpoints combined
    (`features.combine_checkpoints`), then, under ``pool_mean="remove"``, the pool's mean
    direction projected out of T (`features.remove_mean_direction`)."""
    core.check_choice("pool_mean", pool_mean, POOL_MEAN)
    t = combine_checkpoints(list(inputs.train), inputs.weights)
    v = combine_checkpoints(list(inputs.val), inputs.weights, normalize=val_normalize)
    if pool_mean == "remove":
        t, info = remove_mean_direction(t)
        return t, v, info
    return t, v, {"pool_mean": "keep"}


def _walk_method(sign_handling: str, name: str):
    def run(inputs: SelectionInputs, o: SelectOptions) -> SelectionResult:
        t, v, pool_conventions = walk_inputs(inputs, o.val_normalize, o.pool_mean)
        if inputs.graph is not None and o.mode != "graph":
            raise G2ISError("a prebuilt graph is used by mode 'graph'; set mode='graph' or drop "
                            "the graph", param="graph")
        res = plan.g2is_select(
            _storage(t, o.dtype), v, ratio=o.ratio, budget=o.budget, delta=o.delta,
            pca_variance=o.pca_variance, n_components=o.n_components, pca_sign=o.pca_sign,
            val_normalize=o.val_normalize, sign_handling=sign_handling, neighbors=o.neighbors,
            anchor_pool=o.anchor_pool, mode=o.mode, graph=inputs.graph, mesh=inputs.mesh,
            method=name, diagnostics=o.diagnostics, diagnostics_sample=o.diagnostics_sample)
        return dataclasses.replace(res, conventions={
            **res.conventions, **pool_conventions,
            "checkpoint_weights": [float(w) for w in inputs.weights],
            "combine_checkpoints": "this project's extension" if len(inputs.train) > 1
            else "one checkpoint"})

    return run


def _less(inputs: SelectionInputs, o: SelectOptions) -> SelectionResult:
    res = baselines.less_select(list(inputs.train), list(inputs.val), ratio=o.ratio,
                                budget=o.budget, weights=inputs.weights,
                                subtasks=inputs.subtasks)
    return _with_pool_diagnostics(res, inputs, o)


def _random(inputs: SelectionInputs, o: SelectOptions) -> SelectionResult:
    res = baselines.random_select(inputs.n_rows, ratio=o.ratio, budget=o.budget, seed=o.seed)
    return _with_pool_diagnostics(res, inputs, o)


def _rds(inputs: SelectionInputs, o: SelectOptions) -> SelectionResult:
    if len(inputs.train) != 1:
        raise G2ISError("rds takes one representation feature set each for T and V, not "
                        "several", param="train")
    return baselines.representation_select(inputs.train[0], inputs.val[0], ratio=o.ratio,
                                           budget=o.budget, subtasks=inputs.subtasks)


def _with_pool_diagnostics(res: SelectionResult, inputs: SelectionInputs,
                           o: SelectOptions) -> SelectionResult:
    if not o.diagnostics or inputs.mesh is not None:
        return res
    t, _, _ = walk_inputs(inputs)
    return diagnostics.diagnose(res, t, None, sample=o.diagnostics_sample)


_RUNNERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "g2is": (_WALK_OPTIONS, _walk_method("signed", "g2is")),
    "g2is-robust": (_WALK_OPTIONS, _walk_method("both-poles", "g2is-robust")),
    "g2is-abs": (_WALK_OPTIONS, _walk_method("absolute", "g2is-abs")),
    "less": (("ratio", "budget", "diagnostics"), _less),
    "random": (("ratio", "budget", "seed"), _random),
    "rds": (("ratio", "budget"), _rds),
}
METHODS: dict[str, MethodSpec] = {
    name: MethodSpec(name, METHOD_HELP[name], *_RUNNERS[name]) for name in METHOD_NAMES}


def run_method(name: str, inputs: SelectionInputs, options: SelectOptions | None = None
               ) -> SelectionResult:
    """Select with the registered method `name`."""
    core.check_choice("method", name, METHOD_NAMES)
    return METHODS[name].run(inputs, options or SelectOptions())


# Options added after run folders existed: left out of `method_config` at their default, so
# that the fingerprints of earlier selections (which hash this config) stay valid.
_OMITTED_AT_DEFAULT = {"pool_mean": "keep"}


def method_config(name: str, options: SelectOptions) -> dict[str, Any]:
    """The options `name` reads, as recorded in selection.json (an option named in
    `_OMITTED_AT_DEFAULT` only when it differs from that default; `SelectionResult.conventions`
    records it always)."""
    return {"method": name, **{k: getattr(options, k) for k in METHODS[name].options
                               if _OMITTED_AT_DEFAULT.get(k, object()) != getattr(options, k)}}


__all__ = ["METHODS", "METHOD_NAMES", "MethodName", "MethodSpec", "SelectOptions",
           "SelectionInputs", "method_config", "run_method", "walk_inputs"]
