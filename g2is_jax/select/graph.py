"""The instruction graph: every row's `k` most cosine-similar rows, built in blocks.

Design. Rows are unit vectors, so cosine is a dot product. A jitted kernel takes one block of
query rows and loops (`lax.fori_loop`) over blocks of key rows, keeping a running top-k: each key
block's similarities are appended to the running list and `lax.top_k` keeps the best k. Memory is
O(block_rows·key_block + N·k), never N×N. The Python loop over query blocks only drives a tqdm
bar; it transfers nothing but the block's (block_rows×k) result.

Order within a row is similarity descending, index ascending (`lax.top_k` keeps earlier
positions first on ties, and earlier key blocks hold lower indices), with -0.0 folded into 0.0:
the same order the walk's on-the-fly mode uses. The row itself is part of its list.

A graph is saved as arrays (`.npz`: indices, similarities, and a JSON `meta`), so it can be
inspected, plotted and reused by `g2is select --mode graph --graph FILE`. The mixed graph of the
paper adds the validation rows as nodes N..N+n-1 for inspection; the walk needs the pool-only one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from g2is_jax.errors import G2ISError
from g2is_jax.select import core

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class KnnGraph:
    """Neighbour lists: `indices[i]` (k,) sorted by `similarities[i]` descending."""

    indices: np.ndarray  # (M, k) int32, M = n_train + n_val
    similarities: np.ndarray  # (M, k) float32 (float64 under x64 with float64 features)
    n_train: int
    n_val: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, n_train=self.n_train, n_val=self.n_val, k=self.k)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:  # a file handle: np.savez must not append ".npz"
            np.savez(
                fh,
                indices=self.indices,
                similarities=self.similarities,
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KnnGraph:
        path = Path(path)
        if not path.is_file():
            raise G2ISError(f"graph file {path} not found; build it with `g2is graph`")
        try:
            with np.load(path, allow_pickle=False) as z:
                indices, sims, meta = z["indices"], z["similarities"], json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise G2ISError(
                f"{path} is not a graph file written by `g2is graph` ({exc}); rebuild it"
            ) from exc
        if indices.ndim != 2 or indices.shape != sims.shape:
            raise G2ISError(f"{path}: indices and similarities shapes disagree; rebuild it")
        return cls(
            indices.astype(np.int32),
            sims,
            int(meta.get("n_train", indices.shape[0])),
            int(meta.get("n_val", 0)),
            meta,
        )


def fingerprint(features: Any) -> str:
    """A cheap identity of a feature matrix: shape, dtype and 16 evenly spaced rows."""
    n, d = features.shape
    h = hashlib.sha256(f"{n}x{d}:{np.dtype(features.dtype).name}".encode())
    for i in np.unique(np.linspace(0, n - 1, 16).astype(np.int64)):
        h.update(np.ascontiguousarray(np.asarray(features[int(i)])).tobytes())
    return h.hexdigest()[:32]


@functools.partial(jax.jit, static_argnames=("k", "block_rows", "key_block"))
def _block_topk(x, q_start, n_valid, *, k: int, block_rows: int, key_block: int):
    acc = core.acc_dtype(x.dtype)
    q = lax.dynamic_slice_in_dim(x, q_start, block_rows)
    n_blocks = x.shape[0] // key_block

    def body(j, carry):
        vals, idx = carry
        keys = lax.dynamic_slice_in_dim(x, j * key_block, key_block)
        s = jnp.dot(q, keys.T, precision=_HIGHEST, preferred_element_type=acc)
        cols = j * key_block + jnp.arange(key_block, dtype=jnp.int32)
        s = jnp.where((cols < n_valid)[None, :], jnp.where(s == 0, 0, s), -jnp.inf)
        both_v = jnp.concatenate([vals, s], axis=1)
        both_i = jnp.concatenate([idx, jnp.broadcast_to(cols[None, :], s.shape)], axis=1)
        top_v, at = lax.top_k(both_v, k)
        return top_v, jnp.take_along_axis(both_i, at, axis=1)

    init = (
        jnp.full((block_rows, k), -jnp.inf, acc),
        jnp.full((block_rows, k), x.shape[0], jnp.int32),
    )
    return lax.fori_loop(0, n_blocks, body, init)


def knn_graph(
    unit_rows: Any,
    k: int,
    *,
    n_rows: int | None = None,
    block_rows: int = 512,
    key_block: int = 4096,
    progress: bool | None = None,
) -> KnnGraph:
    """Top-`k` cosine neighbours of each of the first `n_rows` unit rows (padding ignored).

    `unit_rows` are already normalised (`core.prepare_rows`). `k` is capped at `n_rows`.
    `progress=None` shows a tqdm bar only on a terminal.
    """
    x = jnp.asarray(unit_rows)
    chex.assert_rank(x, 2)
    n = x.shape[0] if n_rows is None else int(n_rows)
    k = min(core.check_positive_int("neighbors", k), n)
    # Key blocks: a multiple of the row tile that divides the padded row count.
    tile = core.ROW_TILE
    key_block = max(tile, min(key_block, core.padded_rows(max(n, x.shape[0]))) // tile * tile)
    npad = -(-max(n, x.shape[0]) // key_block) * key_block
    if npad != x.shape[0]:
        x = jnp.pad(x, ((0, npad - x.shape[0]), (0, 0)))
    block_rows = min(block_rows, npad)
    width = min(core.bucket(k), npad)  # compiled width; nearby k share one program
    starts = list(range(0, n, block_rows))
    out_i = np.empty((n, k), np.int32)
    out_v = np.empty((n, k), core.acc_dtype(x.dtype))
    disable = None if progress is None else not progress
    for s in tqdm(starts, desc="kNN graph", unit="block", disable=disable):
        q0 = min(s, npad - block_rows)  # the last block overlaps its predecessor: one shape
        vals, idx = _block_topk(
            x, jnp.int32(q0), jnp.int32(n), k=width, block_rows=block_rows, key_block=key_block
        )
        stop = min(s + block_rows, n)
        out_v[s:stop] = np.asarray(vals)[s - q0 : stop - q0, :k]
        out_i[s:stop] = np.asarray(idx)[s - q0 : stop - q0, :k]
    return KnnGraph(out_i, out_v, n_train=n, meta={"dim": int(x.shape[1])})


def mixed_graph(train_unit: Any, val_unit: Any, k: int, *, n_train: int, **kw: Any) -> KnnGraph:
    """The graph over pool rows and validation rows together (validation nodes are N..N+n-1)."""
    t = jnp.asarray(train_unit)[:n_train]
    v = jnp.asarray(val_unit)
    core.check_dims(t, v)
    both = jnp.concatenate([t, v.astype(t.dtype)], axis=0)
    g = knn_graph(both, k, n_rows=n_train + v.shape[0], **kw)
    return dataclasses.replace(g, n_train=n_train, n_val=int(v.shape[0]))


def neighbor_indices(graph: Any, n_rows: int) -> np.ndarray:
    """The (N×k) index array the walk reads, from a `KnnGraph` or a raw array, checked."""
    if isinstance(graph, KnnGraph):
        if graph.n_val:
            raise G2ISError(
                "this is a mixed graph (validation rows as nodes); the walk needs the pool-only "
                "graph: rebuild with `g2is graph` without --mixed"
            )
        idx = graph.indices
    else:
        idx = np.asarray(graph)
    if idx.ndim != 2 or idx.shape[0] != n_rows:
        raise G2ISError(
            f"the graph has {idx.shape[0] if idx.ndim else 0} rows but the pool has {n_rows}; "
            "rebuild it from these features with `g2is graph`"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise G2ISError("the graph refers to rows outside the pool; rebuild it with `g2is graph`")
    return idx.astype(np.int32)
