"""Feature files for selection: loading, checking, combining checkpoints; the pool's JSONL lines.

A feature source is either a `.npy` file (N×d) or a feature-store directory holding
`features.npy` and `meta.json` ("n", "dim", "gradient", "record_ids", "checkpoint_lr", ...).
Arrays are memory-mapped; checks (shape against meta, finite values) read them in row chunks.

Several checkpoints (this project's extension: the authors' walk consumes one T and one V).
LESS sums its per-checkpoint scores weighted by each checkpoint's learning rate. The walk needs
one geometry, so `combine_checkpoints` builds it: each checkpoint's rows are normalised, scaled by
sqrt(w_i) (w the learning rates, summing to 1) and concatenated. The dot of two combined rows is
then sum_i w_i cos_i, the same lr-weighted average of per-checkpoint cosines that LESS uses,
every combined row of nonzero features has unit norm, and PCA of the combined validation rows
sees each checkpoint's directions in proportion to its weight. With ``normalize="raw"`` (V under
``val_normalize="raw"``) the rows are scaled by sqrt(w_i) but not normalised, so that one V
normalisation rule holds for one checkpoint and for several. One checkpoint is passed through
unchanged: the walk normalises T's rows and `core.core_knowledge` applies `val_normalize` to V.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from g2is_jax.errors import G2ISError
from g2is_jax.select import core
from g2is_jax.store import FeatureSet, file_sha256, read_features

log = logging.getLogger(__name__)

_CHECK_ROWS = 16384  # rows read at a time when checking a memory-mapped file


# The feature-set format is owned by `g2is_jax.store` (one reader, one typed meta); these names
# stay as aliases for the selection code.
Features = FeatureSet


def load_features(path: str | Path, *, role: str = "train") -> Features:
    """Load a `.npy` file or a feature-store directory and check it thoroughly
    (`g2is_jax.store.read_features`)."""
    return read_features(path, role=role)


def load_checkpoints(paths: Sequence[str | Path], *, role: str) -> list[Features]:
    """Several checkpoints' features of the same rows: equal row counts and dims required."""
    sets = [load_features(p, role=role) for p in paths]
    first = sets[0]
    for s in sets[1:]:
        if s.n != first.n or s.dim != first.dim:
            raise G2ISError(
                f"{role} features {s.source} are {s.n}×{s.dim} but {first.source} is "
                f"{first.n}×{first.dim}; every checkpoint must cover the same rows and dim"
            )
        if s.record_ids and first.record_ids and s.record_ids != first.record_ids:
            raise G2ISError(
                f"{s.source} and {first.source} list different record_ids; compute every "
                "checkpoint's features from the same data file"
            )
    return sets


def check_pairing(train: Sequence[Features], val: Sequence[Features]) -> None:
    """Train and validation sets: one each per checkpoint, same dims pairwise."""
    if len(train) != len(val):
        raise G2ISError(
            f"{len(train)} --train-features but {len(val)} --val-features; give one of each "
            "per checkpoint, in the same order"
        )
    for t, v in zip(train, val, strict=True):
        if t.dim != v.dim:
            raise G2ISError(
                f"feature dimensions disagree: {t.source} is {t.n}×{t.dim}, {v.source} is "
                f"{v.n}×{v.dim}; compute both with the same projection dim and seed"
            )
        gt, gv = t.meta.get("gradient"), v.meta.get("gradient")
        if gt and gv and gt == gv == "adam":
            log.warning("validation features use Adam gradients; LESS and G2IS expect sgd there")


def checkpoint_weights(sets: Sequence[Features]) -> np.ndarray:
    """Each checkpoint's learning rate from meta ("checkpoint_lr"), normalised to sum to 1."""
    lrs = [s.meta.get("checkpoint_lr") for s in sets]
    if len(sets) == 1:
        return np.ones(1)
    if any(lr is None for lr in lrs):
        log.warning("checkpoint_lr missing in some meta.json: weighting checkpoints equally")
        return np.full(len(sets), 1.0 / len(sets))
    w = np.asarray(lrs, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise G2ISError(f"checkpoint_lr values {lrs} must be non-negative with a positive sum")
    return w / w.sum()


def combine_checkpoints(arrays: Sequence[Any], weights: Sequence[float], *,
                        normalize: str = "unit") -> np.ndarray:
    """One feature matrix for the walk from several checkpoints (see the module docstring)."""
    if normalize not in ("unit", "raw"):
        raise G2ISError(f"normalize must be 'unit' or 'raw', got {normalize!r}",
                        param="val_normalize")
    if len(arrays) == 1:
        return arrays[0]
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    n = arrays[0].shape[0]
    out = np.empty((n, sum(a.shape[1] for a in arrays)), np.float32)
    col = 0
    for a, wi in zip(arrays, w, strict=True):
        d = a.shape[1]
        for s in range(0, n, _CHECK_ROWS):
            x = np.asarray(a[s : s + _CHECK_ROWS], dtype=np.float64)
            if normalize == "unit":  # out of place: `x` may be a view of the caller's array
                x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)
            out[s : s + _CHECK_ROWS, col : col + d] = np.sqrt(wi) * x
        col += d
    return out


@jax.jit
def project_out(rows: Any, direction: Any) -> jax.Array:
    """`rows` (N×d) with their component along the unit vector `direction` (d) removed:
    rows − (rows·direction) directionᵀ. Pure and jitted (composes under `jax.jit` and
    `jax.vmap`); computed in float32 (float64 for float64 rows), returned in the rows' dtype."""
    x = jnp.asarray(rows)
    acc = core.acc_dtype(x.dtype)
    xa, m = x.astype(acc), jnp.asarray(direction).astype(acc)
    along = jnp.dot(xa, m, precision=lax.Precision.HIGHEST)
    return (xa - along[:, None] * m[None, :]).astype(x.dtype)


def remove_mean_direction(train: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Host edge of ``pool_mean="remove"``: the pool's features (N×d) with the mean direction of
    their unit rows (`diagnostics.mean_direction`) projected out of every row, and what was
    removed: {"pool_mean": "remove", "removed_energy": the share of the unit-row energy that lay
    on that direction}.

    Why (this project's option, not the authors'): LESS's pool feature is Adam's update
    m′/√v′, whose first moment m′ = β₁m + (1−β₁)g carries the optimizer's running mean m into
    every row; that shared direction can hold most of every row's energy, so that no two rows
    conflict and the walk's no-conflict rule never fires. Removing it leaves each row's own
    part: the walk (which normalises rows) then compares rows, and rows with k, without the
    shared direction. Validation features are left as they are. A row that lay almost wholly on
    the direction keeps only its small remainder, which the walk scales up like any other.
    Rows are streamed in chunks; the result is float32 (float64 input stays float64)."""
    from g2is_jax.select import diagnostics

    t = core.as_features(train, "train features")
    direction = diagnostics.mean_direction(t, check=False)
    dtype = core.acc_dtype(t.dtype)
    if direction is None:
        return np.array(t, dtype=dtype), {"pool_mean": "remove", "removed_energy": 0.0}
    out = np.empty(t.shape, dtype)
    energy = diagnostics.direction_energy(t, direction)
    m = jnp.asarray(direction)
    for s in range(0, t.shape[0], _CHECK_ROWS):
        chunk = jnp.asarray(np.asarray(t[s : s + _CHECK_ROWS], dtype))
        out[s : s + _CHECK_ROWS] = np.asarray(project_out(chunk, m))
    return out, {"pool_mean": "remove", "removed_energy": round(float(energy), 6)}


def load_subtasks(path: str | Path, n_val: int) -> list[str]:
    """Subtask names, one per validation row: a JSON list of strings, or text, one per line."""
    p = Path(path)
    if not p.is_file():
        raise G2ISError(f"subtasks file {p} not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise G2ISError(f"{p} is not valid JSON ({exc}); write a list of subtask names")
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise G2ISError(f"{p} must hold a JSON list of strings, one per validation row")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != n_val:
        raise G2ISError(
            f"{p} names {len(names)} subtasks for {n_val} validation rows; give one per row, "
            "in the order of the validation features"
        )
    return names


def read_jsonl_lines(path: str | Path) -> list[bytes]:
    """The records of a JSONL file as raw lines (terminator kept); blank lines are not records."""
    p = Path(path)
    if not p.is_file():
        raise G2ISError(f"data file {p} not found")
    data = p.read_bytes()
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1] + b"\n")  # no final newline: add one so records stay separate
    return [line for line in out if line.strip()]


data_sha256 = file_sha256  # the one file hash, `g2is_jax.store.file_sha256`


def check_data_matches(lines: Sequence[bytes], feats: Features, data_path: str | Path) -> None:
    """The pool file must have one record per feature row (and the same hash when meta has one)."""
    if len(lines) != feats.n:
        raise G2ISError(
            f"{data_path} has {len(lines)} records but {feats.source} has {feats.n} feature "
            "rows; pass the data file the features were computed from"
        )
    want = feats.meta.get("data_sha256")
    if isinstance(want, str) and want != data_sha256(data_path):
        raise G2ISError(
            f"{data_path} changed since {feats.source} was computed (sha256 differs); pass the "
            "original file or recompute the features"
        )


def write_selected(lines: Sequence[bytes], indices: Sequence[int], out: str | Path) -> Path:
    """The selected lines, unchanged, in selection order."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.writelines(lines[int(i)] for i in indices)
    tmp.replace(out)
    return out
