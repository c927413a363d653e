"""Core knowledge, budgets and the shared pieces of every selection method.

Design. Selection starts on the host with small, exact work and hands one big array program to the
device:

* `core_knowledge` is the PCA of the validation features V (n×d, n small). It runs in NumPy float64
  whatever the feature dtype: the number of components it keeps is data dependent (no static
  shape for a jit), and the weights decide integer budgets, which must not hinge on float32
  rounding. It follows scikit-learn's PCA conventions, which the authors' release used.
* `allocate_budgets` splits `int(N * ratio)` over the components by the largest-remainder method.
* `prepare_rows` pads T to a multiple of `ROW_TILE` rows and normalises the rows on device, keeping
  the dtype. The padding matters beyond sharding: XLA's matrix-vector product handles a ragged
  tail of rows with a different summation order, so two identical rows could get dot products
  that differ in the last bit, and the walk breaks ties by index only when equal rows give equal
  values. With whole tiles every row goes through the same code (tested in the property tests).

Everything a user can get wrong is checked here first and raised as `G2ISError` naming the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from g2is_jax.allocate import largest_remainder
from g2is_jax.errors import G2ISError
from g2is_jax.vocab import PCA_SIGNS, VAL_NORMALIZE, PcaSign, ValNormalize  # noqa: F401

# A row whose norm is below this stays (nearly) zero instead of being blown up to unit length.
NORM_FLOOR = 1e-10
# Rows are padded to a multiple of this (see the module docstring).
ROW_TILE = 128
# Step kinds recorded for every selected row.
STEP_ANCHOR, STEP_NEIGHBOR, STEP_FALLBACK = 0, 1, 2
STEP_NAMES = ("anchor", "neighbor", "fallback")
# Relative tolerance within which two magnitudes tie when a PCA sign rule picks its entry.
SIGN_TIE_RTOL = 1e-9




@dataclasses.dataclass(frozen=True)
class CoreKnowledge:
    """Principal directions of the validation features and their budget weights.

    `scores` are the centred validation rows projected on the oriented components (n, C): the
    sign-robust method splits each component's budget by the energy of its positive and negative
    scores. `pca_sign` and `val_normalize` name the conventions that produced the directions.
    """

    components: np.ndarray  # (C, d) float64, unit rows
    explained_variance_ratio: np.ndarray  # (C,) of the whole validation set's variance
    weights: np.ndarray  # (C,) the kept ratios renormalised to sum to 1
    scores: np.ndarray  # (n, C) float64
    pca_sign: str = "v-based"
    val_normalize: str = "unit"


@dataclasses.dataclass(frozen=True)
class ComponentSummary:
    """What one walk (a component, or one pole of it) did.

    `pole` is +1 / -1 for the sign-robust method's two walks per component and 0 otherwise.
    The rejection counts are filled by `diagnostics.walk_diagnostics` (None when not computed):
    summed over the component's walk steps, the unselected pool rows the no-conflict rule
    excluded, and those it allowed but the consistency rule excluded; `candidates` is the sum of
    unselected rows over the same steps (the denominator).
    """

    component: int
    pole: int
    explained_variance_ratio: float
    weight: float
    budget: int
    selected: int
    neighbor_steps: int
    fallback_steps: int
    conflict_rejected: int | None = None
    consistency_rejected: int | None = None
    candidates: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        """Read access by field name (``summary["selected"]``), as when these were dicts."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class SelectionResult:
    """A selection: row indices in the order they were chosen, with how each was chosen.

    `components[i]` is the walk (index into `per_component`) that chose row `indices[i]` (-1 for
    methods without components) and `steps[i]` one of `STEP_NAMES` indices (-1: by score).
    `conventions` records every choice the result depends on (sign rule, V normalisation,
    neighbour-list width, ...); `diagnostics` the walk and pool diagnostics when computed.
    """

    indices: np.ndarray
    components: np.ndarray
    steps: np.ndarray
    per_component: tuple[ComponentSummary, ...]
    method: str
    budget: int
    conventions: dict[str, Any] = dataclasses.field(default_factory=dict)
    diagnostics: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "indices": [int(i) for i in self.indices],
            "per_component": [c.to_json() for c in self.per_component],
            "components": [int(c) for c in self.components],
            "steps": [STEP_NAMES[int(s)] if s >= 0 else "score" for s in self.steps],
            "conventions": dict(self.conventions),
            "diagnostics": self.diagnostics,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SelectionResult:
        """The result back from `to_json` (as written in selection.json)."""
        steps = [STEP_NAMES.index(s) if s in STEP_NAMES else -1 for s in doc["steps"]]
        return cls(
            indices=np.asarray(doc["indices"], np.int64),
            components=np.asarray(doc["components"], np.int64),
            steps=np.asarray(steps, np.int64),
            per_component=tuple(ComponentSummary(**c) for c in doc.get("per_component", [])),
            method=str(doc["method"]),
            budget=int(doc["budget"]),
            conventions=dict(doc.get("conventions") or {}),
            diagnostics=doc.get("diagnostics"),
        )

    def with_diagnostics(self, diagnostics: dict[str, Any],
                         per_component: Sequence[ComponentSummary] | None = None
                         ) -> SelectionResult:
        return dataclasses.replace(
            self, diagnostics=diagnostics,
            per_component=self.per_component if per_component is None else tuple(per_component))


# ---------------------------------------------------------------------------------------------
# Checks at the boundary.


def check_fraction(name: str, value: float, *, closed_high: bool = True) -> float:
    """A number in (0, 1] (or (0, 1) when `closed_high` is False)."""
    value = float(value)
    ok = value > 0 and (value <= 1 if closed_high else value < 1) and math.isfinite(value)
    if not ok:
        interval = "(0, 1]" if closed_high else "(0, 1)"
        raise G2ISError(f"{name} must be in {interval}, got {value}", param=name)
    return value


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise G2ISError(f"{name} must be a positive integer, got {value}", param=name)
    return int(value)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise G2ISError(f"{name} must be one of {', '.join(choices)}, got {value!r}", param=name)
    return value


def total_budget(n_rows: int, ratio: float) -> int:
    """`int(N * ratio)` exactly as Python computes it, checked to select at least one row."""
    check_fraction("ratio", ratio)
    total = int(n_rows * ratio)
    if total < 1:
        raise G2ISError(
            f"int(N * ratio) = int({n_rows} * {ratio}) = 0 rows to select; "
            f"raise ratio to at least {1.0 / n_rows:.3g} (1/N)", param="ratio"
        )
    return total


def check_budget(budget: int, n_rows: int) -> int:
    budget = check_positive_int("budget", budget)
    if budget > n_rows:
        raise G2ISError(f"budget {budget} is larger than the pool ({n_rows} rows); lower it",
                        param="budget")
    return budget


def as_features(x: Any, name: str) -> Any:
    """A 2-D floating array, finite and non-empty, dtype kept (bfloat16 allowed).

    NumPy input is checked on the host and stays NumPy (it is padded there before the single
    transfer, see `prepare_rows`); a JAX array is checked on its device.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if len(x.shape) != 2:
        raise G2ISError(f"{name} must be a 2-D array (rows × dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise G2ISError(f"{name} is empty (shape {tuple(x.shape)}); it needs at least one row")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise G2ISError(f"{name} must hold floating-point features, got dtype {x.dtype}")
    if x.dtype == np.float64 and not jax.config.jax_enable_x64:
        # Without x64 JAX would round to float32 anyway; do it here, once, explicitly.
        x = np.asarray(x, dtype=np.float32)
    if isinstance(x, jax.Array):
        bad_rows = jnp.any(~jnp.isfinite(x), axis=1)
        first_bad = int(jnp.argmax(bad_rows)) if bool(jnp.any(bad_rows)) else -1
    else:
        x = np.asarray(x)
        first_bad = -1
        for s in range(0, x.shape[0], 16384):  # chunks: no N×d temporary for a big memmap
            bad_rows = ~np.isfinite(np.asarray(x[s : s + 16384], np.float32)).all(axis=1)
            if bad_rows.any():
                first_bad = s + int(np.argmax(bad_rows))
                break
    if first_bad >= 0:
        raise G2ISError(
            f"{name} has NaN or Inf values (first in row {first_bad}); recompute or drop those rows"
        )
    return x


def check_dims(train: Any, val: Any) -> None:
    if train.shape[1] != val.shape[1]:
        raise G2ISError(
            f"feature dimensions disagree: train is {train.shape[0]}×{train.shape[1]}, "
            f"validation is {val.shape[0]}×{val.shape[1]}; compute both with the same "
            "projection (same --dim and seed) and the same checkpoints"
        )


def acc_dtype(dtype: Any) -> np.dtype:
    """The dtype the walk accumulates in: float64 for float64 storage, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# Core knowledge (host, float64).


def normalize_val(val: Any, how: str = "unit") -> np.ndarray:
    """Validation rows in float64, unit-normalised (`"unit"`, as LESS stores them) or as given."""
    check_choice("val_normalize", how, VAL_NORMALIZE)
    v = np.asarray(val, dtype=np.float64)
    if how == "unit":
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), NORM_FLOOR)
    return v


def _first_near_max(a: np.ndarray, axis: int) -> np.ndarray:
    """Index of the first entry whose magnitude is within `SIGN_TIE_RTOL` of the largest.

    scikit-learn takes the exact `argmax`; with exact-arithmetic ties (two validation rows give
    scores s and -s; a component like (a, -a)) floating-point noise would pick the winner, so
    near-ties go to the first index instead.
    """
    mag = np.abs(a)
    top = np.max(mag, axis=axis, keepdims=True)
    return np.argmax(mag >= top * (1 - SIGN_TIE_RTOL), axis=axis)


def orientation(u: np.ndarray, vt: np.ndarray, rule: str) -> np.ndarray:
    """Per-component signs (±1) from the thin SVD ``centred = u · diag(s) · vt``.

    * ``"v-based"`` (scikit-learn >= 1.5): the largest-magnitude coordinate of each component
      is made positive.
    * ``"u-based"`` (scikit-learn < 1.5): the validation row with the largest absolute score on
      each component gets a positive score (u's columns are the scores up to a positive factor).

    Near-ties (relative `SIGN_TIE_RTOL`) go to the first index (`_first_near_max`).
    """
    check_choice("pca_sign", rule, PCA_SIGNS)
    count = vt.shape[0]
    if rule == "v-based":
        at = _first_near_max(vt, axis=1)
        signs = np.sign(vt[np.arange(count), at])
    else:
        at = _first_near_max(u[:, :count], axis=0)
        signs = np.sign(u[at, np.arange(count)])
    return np.where(signs == 0, 1.0, signs)


def core_knowledge(
    val: Any,
    *,
    pca_variance: float = 0.5,
    n_components: int | None = None,
    pca_sign: str = "v-based",
    val_normalize: str = "unit",
) -> CoreKnowledge:
    """PCA of the validation features, mean-centred, oriented and weighted as scikit-learn does.

    V's rows are first unit-normalised (``val_normalize="unit"``, the default: LESS stores its
    validation features that way) or used as given (``"raw"``). Keeps the fewest leading
    components whose cumulative explained-variance ratio exceeds `pca_variance`, or exactly
    `n_components` when given (an absolute count: the authors' "count ratio" mode keeps
    max(1, int(columns · val_k)) instead; pass that number here to reproduce it). Each
    component's sign follows `pca_sign` (see `orientation`): the sign is arbitrary in PCA, and
    G2IS's anchors and fallbacks rank by signed similarity, so it is a recorded convention.
    With a single validation row, or rows that are all equal (no variance to analyse), the one
    component is the normalised mean row (its sign is the data's, not a convention).
    """
    v = normalize_val(val, val_normalize)
    chex.assert_rank(v, 2)
    check_choice("pca_sign", pca_sign, PCA_SIGNS)
    n, d = v.shape
    if n_components is None:
        check_fraction("pca_variance", pca_variance, closed_high=False)
    else:
        n_components = check_positive_int("n_components", n_components)
        if n_components > min(n, d):
            raise G2ISError(
                f"n_components={n_components} exceeds min(validation rows, dim) = {min(n, d)}; "
                "lower n_components", param="n_components"
            )
    mean = v.mean(axis=0, keepdims=True)
    centred = v - mean
    u, sing, vt = np.linalg.svd(centred, full_matrices=False)
    total_var = float(np.sum(sing**2))
    conv = {"pca_sign": pca_sign, "val_normalize": val_normalize}
    if n == 1 or total_var <= 0.0 or not np.isfinite(total_var):
        # No spread to analyse (scikit-learn would divide by zero here): the target's knowledge
        # is the direction of its (mean) gradient. Keep its sign: the anchor follows +T·k.
        m = mean[0]
        norm = float(np.linalg.norm(m))
        if norm <= NORM_FLOOR:
            raise G2ISError(
                "the validation features are all zero; recompute them (was the loss masked out?)"
            )
        return CoreKnowledge(m[None, :] / norm, np.ones(1), np.ones(1), np.zeros((n, 1)), **conv)
    ratio = sing**2 / total_var
    if n_components is None:
        # Fewest components whose cumulative ratio *exceeds* the threshold (scikit-learn).
        count = int(np.searchsorted(np.cumsum(ratio), pca_variance, side="right")) + 1
        count = min(count, len(ratio))
    else:
        count = n_components
    signs = orientation(u, vt[:count], pca_sign)
    comps = vt[:count] * signs[:, None]
    comps /= np.maximum(np.linalg.norm(comps, axis=1, keepdims=True), NORM_FLOOR)
    kept = ratio[:count]
    return CoreKnowledge(comps, kept, kept / np.sum(kept), centred @ comps.T, **conv)


def allocate_budgets(total: int, weights: Sequence[float] | np.ndarray, *,
                     ties: Literal["later", "earlier"] = "later") -> np.ndarray:
    """Split `total` rows by `weights` with the largest-remainder method; the parts sum to
    `total`. Equal remainders go to the later component first by default, which is what the
    authors' `np.argsort(...)[::-1]` does (`g2is_jax.allocate.largest_remainder`)."""
    return largest_remainder(total, weights, ties=ties)


# ---------------------------------------------------------------------------------------------
# Rows on device.


def padded_rows(n_rows: int) -> int:
    return max(ROW_TILE, -(-n_rows // ROW_TILE) * ROW_TILE)


def _normalise_impl(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    acc = acc_dtype(x.dtype)
    xa = x.astype(acc)
    norms = jnp.sqrt(jnp.sum(xa * xa, axis=1, keepdims=True))
    unit = (xa / jnp.maximum(norms, NORM_FLOOR)).astype(x.dtype)
    ua = unit.astype(acc)
    return unit, jnp.sum(ua * ua, axis=1)


_normalise = jax.jit(_normalise_impl)
# Public name: unit rows (x's dtype) and their squared norms (accumulation dtype).
normalise_rows = _normalise
# For a device copy made here from host rows: XLA may reuse its buffer for the unit rows, so the
# device holds T once, not twice.
_normalise_owned = jax.jit(_normalise_impl, donate_argnums=0)


def prepare_rows(x: Any) -> tuple[jax.Array, jax.Array]:
    """Unit rows padded with zero rows to a multiple of `ROW_TILE`, and their squared norms.

    Returns (unit (Np×d, x's dtype), sq_norms (Np,) in the accumulation dtype). Squared norms are
    taken from the stored (possibly bfloat16-rounded) rows so the walk's arithmetic is consistent.
    """
    n, d = x.shape
    npad = padded_rows(n)
    if isinstance(x, jax.Array):
        if npad != n:
            x = jnp.pad(x, ((0, npad - n), (0, 0)))
        unit, sq = _normalise(x)
    else:
        if npad != n:
            padded = np.zeros((npad, d), x.dtype)
            padded[:n] = x
            x = padded
        unit, sq = _normalise_owned(jnp.asarray(x))
    chex.assert_shape(unit, (npad, d))
    chex.assert_shape(sq, (npad,))
    return unit, sq


def bucket(n: int, minimum: int = 8) -> int:
    """Round a static size up to a power of two so nearby sizes share one compiled program."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())
