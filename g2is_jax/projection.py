"""Random projections of flattened per-example gradients, ``(B, P) -> (B, d)``, inside jit.

Design
------
Every projection is a pure function of ``(kind, seed, P, d)`` (and ``nnz`` for "sparse"): a
P×d matrix ``R`` that is never held whole. Its entries are threefry2x32 hashes of
``(key(seed), row, word)`` counters (``jax.extend.random.threefry_2x32``, whatever the
process's default PRNG), generated inside a ``lax.fori_loop`` over blocks of rows of ``x``:

* memory stays at one block (``block_size × d`` floats for the dense kinds);
* row ``p`` depends on nothing but ``(seed, p, d)``: not on the batch size, the block size, the
  number of devices or processes, nor on how the P coordinates are split into pytree leaves
  (``apply_tree`` projects leaf by leaf with global row offsets and gets the same matrix as
  ``project(flatten_per_example(tree))``);
* ``P`` need not be a multiple of any block: ``x`` is padded with zero columns, so the matrix's
  definition never changes. Results agree across batch and block sizes to float rounding (XLA may
  order a dot's sums differently for other shapes); the same shapes give the same bytes.

Kinds (all scaled so that ``E[<R^T x, R^T y>] = <x, y>``)
--------------------------------------------------------
``"rademacher"`` (default, as LESS/TRAK): ``R[p, j] = ±1/sqrt(d)``, 32 signs per hashed word.
``"gaussian"``: ``R[p, j] ~ N(0, 1/d)`` (inverse-erf of 23 hashed bits; symmetric).
``"sparse"``: a sparse JL transform with ``nnz`` nonzeros ``±1/sqrt(nnz)`` per input coordinate
    (Kane & Nelson's block construction: the d outputs are cut into ``nnz`` blocks of
    ``m = d/nnz``, each coordinate lands in one bucket of every block). The hash is
    *block-cyclic*: coordinates are taken in chunks of ``m``; for block ``k``, chunk ``c`` is
    cyclically shifted by a hashed ``s[c, k]`` in ``[0, m)``, and every coordinate gets its own
    hashed sign per block. Cost per record: ``nnz`` multiply-adds per coordinate, vectorised
    (a roll and an add per chunk, no scatter), and ``P·nnz`` random bits per batch, versus the
    dense kinds' ``2·P·d`` flops per record and ``P·d`` random numbers per batch.
``"none"``: the identity; the flattened gradient itself (``dim`` is ignored; output (B, P)).

Error
-----
All random kinds are unbiased. Variance of ``<R^T x, R^T y>``, with ``S = Σ_i x_i² y_i²``:
rademacher ``(‖x‖²‖y‖² + <x,y>² - 2S)/d``; gaussian ``(‖x‖²‖y‖² + <x,y>²)/d``; sparse
``(1/d) Σ_{i≠j in different chunks} (x_i² y_j² + x_i y_i x_j y_j)``, i.e. the rademacher variance
minus the within-chunk pairs (shifts of different chunks are independent and uniform, so two
coordinates of different chunks share a bucket of a block with probability 1/m, and
never within a chunk). Given the shifts, the error is a Rademacher chaos in the signs whose
variance, for any shifts, is at most ``(2/nnz) Σ_{c≠c'} ‖x_c‖_4² ‖y_c'‖_4²`` (Cauchy-Schwarz), so
structured (e.g. periodic or low-rank) gradients cannot align badly; only very spiky vectors have
heavier tails than the dense kind, which ``nnz > 1`` reduces.
Measured (tests/test_projection.py::test_sparse_gram_error_matches_dense): relative Frobenius
error of the Gram matrix of 24 correlated, heavy-tailed, low-rank-plus-periodic rows with
P = 12 000 and d = 1024, RMS over 64 seeds: rademacher 0.065, gaussian 0.065, sparse 0.068,
against 0.067, 0.067, 0.066 from the variance formulas; the sparse kind's error spreads a little
more across seeds (standard deviation 0.020 against 0.014 for rademacher).

Why this fast kind (`scripts/bench_projection.py --alternatives`; the measured table is in the
README's Performance section): the dense kinds cost ``2·P·d`` flops per record and ``P·d``
random numbers per batch; a count-sketch with fully hashed buckets is a serial scatter-add on
CPU and non-deterministic atomics on GPU; a blocked subsampled randomized Hadamard transform
has lighter tails for spiky vectors but needs power-of-two sizes and a gather for a random row
subset. The block-cyclic sketch was as fast or faster than both, has exactly the dense kind's
mean and no more variance, and is a few lines of fused vector code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry_2x32

from g2is_jax.errors import G2ISError

KINDS = ("rademacher", "gaussian", "sparse", "none")
DEFAULT_KIND = "rademacher"
DEFAULT_DIM = 8192
DEFAULT_NNZ = 4
# Rows of x per loop step for the dense kinds: the block of R is block × d floats
# (1024 × 8192 × 4 B = 32 MiB). The sparse kind always steps one chunk of d/nnz coordinates.
DEFAULT_BLOCK = 1024
# Bumped whenever the matrix for a given (kind, seed, P, d, nnz) changes; recorded in meta.json.
DEFINITION_VERSION = 1
_MAX_ROWS = 2**32  # row and chunk indices are uint32 hash counters
# Stream tags folded into the seed's key: one independent hash stream per use.
_STREAM_DENSE, _STREAM_SIGNS, _STREAM_SHIFTS = 0, 1, 2


# ----------------------------------------------------------------------------- validation


def _check_config(kind: str, dim: int, nnz: int, block_size: int | None) -> None:
    """Raise G2ISError for a projection config a user could get wrong."""
    if kind not in KINDS:
        raise G2ISError(f"unknown projection kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise G2ISError(f"projection dim must be a positive integer, got {dim!r}")
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz <= 0:
        raise G2ISError(f"sparse projection nnz must be a positive integer, got {nnz!r}")
    if kind == "sparse" and dim % nnz:
        raise G2ISError(
            f"the sparse projection needs dim to be a multiple of nnz, got dim={dim}, nnz={nnz}"
        )
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0
    ):
        raise G2ISError(f"block_size must be a positive integer, got {block_size!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool):
        raise G2ISError(f"projection seed must be an integer, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        if not 0 <= int(seed) < 2**32:
            raise G2ISError(f"projection seed must be in [0, 2**32), got {seed}")
        return
    dtype = getattr(seed, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(seed) != 0:
        raise G2ISError(f"projection seed must be an integer scalar, got {seed!r}")


def _check_batch(x: Any) -> None:
    if jnp.ndim(x) != 2:
        raise G2ISError(
            f"project() needs a 2-D (batch, params) array, got shape {jnp.shape(x)}; "
            "use flatten_per_example() or Projector.apply_tree() for a pytree of gradients"
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise G2ISError(f"project() needs floating point input, got {jnp.result_type(x)}")


# ----------------------------------------------------------------------------- hashing


def _stream_key(seed: Any, stream: int) -> jax.Array:
    """The uint32[2] threefry key of one hash stream of ``seed``."""
    key = jax.random.key(seed, impl="threefry2x32")
    return jax.random.key_data(jax.random.fold_in(key, stream))


def _hash_words(key_u32: jax.Array, hi_u32: jax.Array, n_words: int) -> jax.Array:
    """(len(hi), n_words) uint32: word w of row r is half (w % 2) of
    threefry(key, (hi[r], w//2))."""
    n_pairs = -(-n_words // 2)
    shape = (hi_u32.shape[0], n_pairs)
    hi = jnp.broadcast_to(hi_u32[:, None], shape).reshape(-1)
    lo = jnp.broadcast_to(jnp.arange(n_pairs, dtype=jnp.uint32)[None, :], shape).reshape(-1)
    out = threefry_2x32((key_u32[0], key_u32[1]), jnp.concatenate([hi, lo]))
    half = hi.shape[0]
    words = jnp.stack([out[:half].reshape(shape), out[half:].reshape(shape)], axis=-1)
    return words.reshape(shape[0], 2 * n_pairs)[:, :n_words]


def _signs_from_words(words: jax.Array, n: int) -> jax.Array:
    """±1 float32 from the bits of uint32 words (bit t of word w is sign 32·w + t): (rows, n)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)[None, None, :]
    bits = (words[:, :, None] >> shifts) & jnp.uint32(1)
    bits = bits.reshape(words.shape[0], words.shape[1] * 32)[:, :n]
    return 1.0 - 2.0 * bits.astype(jnp.float32)


def _dense_rows(seed: Any, rows_u32: jax.Array, dim: int, kind: str) -> jax.Array:
    """Rows ``rows_u32`` of the unscaled dense matrix (±1 or N(0, 1)): (len(rows), dim) float32."""
    key = _stream_key(seed, _STREAM_DENSE)
    if kind == "rademacher":
        return _signs_from_words(_hash_words(key, rows_u32, -(-dim // 32)), dim)
    # 23 random bits -> the midpoint of one of 2^23 equal bins of (-1, 1) -> sqrt(2)·erfinv.
    words = _hash_words(key, rows_u32, dim)
    u = ((words >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-22) - 1.0
    return jnp.float32(math.sqrt(2.0)) * lax.erf_inv(u)


def _sparse_chunk(seed: Any, chunk_u32: jax.Array, dim: int, nnz: int):
    """Signs (nnz, m) float32 and shifts (nnz,) int32 of one chunk of m = dim/nnz coordinates."""
    m = dim // nnz
    sign_words = _hash_words(_stream_key(seed, _STREAM_SIGNS), chunk_u32[None], -(-dim // 32))
    signs = _signs_from_words(sign_words, dim).reshape(nnz, m)
    shift_words = _hash_words(_stream_key(seed, _STREAM_SHIFTS), chunk_u32[None], nnz)[0]
    # m = 2^k for the usual dims, making this exactly uniform; otherwise the bias is < m / 2^32.
    return signs, (shift_words % jnp.uint32(m)).astype(jnp.int32)


# ----------------------------------------------------------------------------- projection


def _pad_columns(x_bn: jax.Array, left: int, multiple: int) -> jax.Array:
    right = -(left + x_bn.shape[1]) % multiple
    if left or right:
        x_bn = jnp.pad(x_bn, ((0, 0), (left, right)))
    return x_bn


def _dense_segment(acc_bd, seed, x_bn, offset, *, kind, dim, block):
    block = min(block, x_bn.shape[1])
    x_bn = _pad_columns(x_bn, 0, block)

    def body(j, acc):
        x_blk = lax.dynamic_slice_in_dim(x_bn, j * block, block, axis=1).astype(jnp.float32)
        start = jnp.uint32(offset) + j.astype(jnp.uint32) * jnp.uint32(block)
        r_blk = _dense_rows(seed, start + jnp.arange(block, dtype=jnp.uint32), dim, kind)
        return acc + jnp.dot(x_blk, r_blk, precision=lax.Precision.HIGHEST)

    return lax.fori_loop(0, x_bn.shape[1] // block, body, acc_bd)


def _sparse_segment(accs, seed, x_bn, offset, *, dim, nnz):
    m = dim // nnz
    # Align the segment to the global chunk grid; chunks shared with a neighbouring segment are
    # visited by both, each with zeros in the other's part.
    x_bn = _pad_columns(x_bn, offset % m, m)
    first = offset // m

    def body(j, accs):
        x_chunk = lax.dynamic_slice_in_dim(x_bn, j * m, m, axis=1).astype(jnp.float32)
        signs, shifts = _sparse_chunk(seed, jnp.uint32(first) + j.astype(jnp.uint32), dim, nnz)
        new = []
        for k, acc in enumerate(accs):
            contrib = x_chunk * signs[k][None, :]
            # Coordinate i of the chunk goes to bucket (i + shift) mod m: a cyclic roll.
            doubled = jnp.concatenate([contrib, contrib], axis=1)
            new.append(acc + lax.dynamic_slice_in_dim(doubled, m - shifts[k], m, axis=1))
        return tuple(new)

    return lax.fori_loop(0, x_bn.shape[1] // m, body, accs)


@functools.partial(jax.jit, static_argnames=("kind", "dim", "nnz", "block_size"))
def _project_segments(
    segments: Sequence[jax.Array], seed: Any, *, kind: str, dim: int, nnz: int, block_size: int
) -> jax.Array:
    """Project the column-concatenation of ``segments`` (each (B, n_i)) without building it."""
    batch = segments[0].shape[0]
    offset = 0
    if kind == "sparse":
        accs = tuple(jnp.zeros((batch, dim // nnz), jnp.float32) for _ in range(nnz))
        for seg in segments:
            if seg.shape[1]:
                accs = _sparse_segment(accs, seed, seg, offset, dim=dim, nnz=nnz)
            offset += seg.shape[1]
        return jnp.concatenate(accs, axis=1) * jnp.float32(1.0 / math.sqrt(nnz))
    acc = jnp.zeros((batch, dim), jnp.float32)
    for seg in segments:
        if seg.shape[1]:
            acc = _dense_segment(acc, seed, seg, offset, kind=kind, dim=dim, block=block_size)
        offset += seg.shape[1]
    return acc * jnp.float32(1.0 / math.sqrt(dim))


def _project_checked(
    segments: list[jax.Array], *, kind: str, dim: int, seed: Any, block_size: int | None, nnz: int
) -> jax.Array:
    _check_config(kind, dim, nnz, block_size)
    _check_seed(seed)
    batch = segments[0].shape[0]
    n_params = sum(s.shape[1] for s in segments)
    if kind == "none":
        return jnp.concatenate([s.astype(jnp.float32) for s in segments], axis=1)
    block = block_size or DEFAULT_BLOCK
    if n_params + block >= _MAX_ROWS:
        raise G2ISError(f"P = {n_params} parameters is too many to project (limit about 2**32)")
    out = _project_segments(tuple(segments), seed, kind=kind, dim=dim, nnz=nnz, block_size=block)
    chex.assert_shape(out, (batch, dim))
    return out


def project(
    x_bp: jax.Array,
    *,
    kind: str = DEFAULT_KIND,
    dim: int = DEFAULT_DIM,
    seed: int | jax.Array = 0,
    block_size: int | None = None,
    nnz: int = DEFAULT_NNZ,
) -> jax.Array:
    """Project a batch of flattened vectors: (B, P) float -> (B, dim) float32 ((B, P) for "none").

    Pure and jit-compatible, also inside another jit (``seed`` may be traced; the other options
    are static). ``block_size`` (dense kinds) trades memory for speed and never changes the
    matrix. ``nnz`` is the number of nonzeros per coordinate of the "sparse" kind.
    """
    _check_batch(x_bp)
    return _project_checked([x_bp], kind=kind, dim=dim, seed=seed, block_size=block_size, nnz=nnz)


# ----------------------------------------------------------------------------- pytrees


def _leaves_2d(tree: Any) -> list[jax.Array]:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise G2ISError("cannot flatten an empty gradient pytree (it has no array leaves)")
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        more = " ..." if len(shapes) > 8 else ""
        raise G2ISError(
            "every leaf of a per-example gradient pytree needs the same leading batch axis; "
            f"got leaf shapes {shapes[:8]}{more}"
        )
    out = []
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise G2ISError(f"gradient leaves must be floating point, got {jnp.result_type(leaf)}")
        out.append(jnp.reshape(leaf, (shapes[0][0], -1)))
    return out


def flatten_per_example(tree: Any) -> jax.Array:
    """Flatten a per-example pytree (leading batch axis B on every leaf) to (B, P) float32.

    Leaf order is ``jax.tree_util.tree_leaves`` order (dict keys sorted); each leaf is raveled in
    C order after its batch axis.
    """
    return jnp.concatenate([leaf.astype(jnp.float32) for leaf in _leaves_2d(tree)], axis=1)


@dataclasses.dataclass(frozen=True)
class Projector:
    """A projection config; a pure callable ``(B, P) -> (B, dim)``. Hashable, so jit-static.

    ``nnz`` is used by "sparse" only, ``block_size`` by the dense kinds only (None: a default),
    and ``dim`` is ignored by "none" (whose output width is P).
    """

    kind: str = DEFAULT_KIND
    dim: int = DEFAULT_DIM
    seed: int = 0
    nnz: int = DEFAULT_NNZ
    block_size: int | None = None

    def __post_init__(self) -> None:
        _check_config(self.kind, self.dim, self.nnz, self.block_size)
        if not isinstance(self.seed, int):
            raise G2ISError(f"Projector seed must be a Python int, got {self.seed!r}")
        _check_seed(self.seed)

    def _kwargs(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "block_size": self.block_size,
            "nnz": self.nnz,
        }

    def __call__(self, x_bp: jax.Array) -> jax.Array:
        return project(x_bp, **self._kwargs())

    def apply_tree(self, grads_tree: Any) -> jax.Array:
        """Project a per-example gradient pytree: ``self(flatten_per_example(tree))``.

        Works leaf by leaf with global row offsets, so the (B, P) concatenation is never built.
        """
        return _project_checked(_leaves_2d(grads_tree), **self._kwargs())

    def out_dim(self, num_params: int) -> int:
        """Width of the output for P = ``num_params`` inputs."""
        return num_params if self.kind == "none" else self.dim

    def describe(self) -> dict[str, Any]:
        """The fields that identify the matrix, for a feature store's meta.json."""
        desc: dict[str, Any] = {"kind": self.kind, "seed": self.seed}
        if self.kind != "none":
            desc.update(dim=self.dim, hash="threefry2x32", definition=DEFINITION_VERSION)
        if self.kind == "sparse":
            desc["nnz"] = self.nnz
        return desc


# ----------------------------------------------------------------------------- references


@functools.partial(jax.jit, static_argnames=("kind", "num_params", "dim"))
def _dense_matrix(seed: Any, *, kind: str, num_params: int, dim: int) -> jax.Array:
    return _dense_rows(seed, jnp.arange(num_params, dtype=jnp.uint32), dim, kind)


@functools.partial(jax.jit, static_argnames=("n_chunks", "dim", "nnz"))
def _sparse_chunks(seed: Any, *, n_chunks: int, dim: int, nnz: int):
    chunks = jnp.arange(n_chunks, dtype=jnp.uint32)
    return jax.vmap(lambda c: _sparse_chunk(seed, c, dim, nnz))(chunks)


def dense_matrix(kind: str, seed: int, num_params: int, dim: int) -> np.ndarray:
    """The whole scaled P×d matrix of a dense kind (float64), for tests and small P only."""
    _check_config(kind, dim, DEFAULT_NNZ, None)
    if kind not in ("rademacher", "gaussian"):
        raise G2ISError(f"dense_matrix() is for 'rademacher' or 'gaussian', got {kind!r}")
    rows = _dense_matrix(seed, kind=kind, num_params=num_params, dim=dim)
    return np.asarray(rows, np.float64) / math.sqrt(dim)


def sparse_structure(
    seed: int, num_params: int, dim: int, nnz: int = DEFAULT_NNZ
) -> tuple[np.ndarray, np.ndarray]:
    """Buckets (P, nnz) int64 and signs (P, nnz) ±1 of the "sparse" kind, for tests.

    Coordinate p has value ``sign[p, k] / sqrt(nnz)`` in output ``bucket[p, k]`` for each k.
    """
    _check_config("sparse", dim, nnz, None)
    m = dim // nnz
    n_chunks = -(-num_params // m)
    signs, shifts = _sparse_chunks(seed, n_chunks=n_chunks, dim=dim, nnz=nnz)  # (C,nnz,m), (C,nnz)
    signs = np.asarray(signs).transpose(0, 2, 1).reshape(n_chunks * m, nnz)[:num_params]
    pos = np.arange(n_chunks * m) % m
    shift_per_coord = np.repeat(np.asarray(shifts, np.int64), m, axis=0)  # (C·m, nnz)
    buckets = (pos[:, None] + shift_per_coord) % m + np.arange(nnz)[None, :] * m
    return buckets[:num_params], signs
