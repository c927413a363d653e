"""Projection throughput in records/s: dense Rademacher vs the fast "sparse" kind vs TRAK.

Run: ``python scripts/bench_projection.py [--params 1000000] [--dim 8192] [--batch 32]``.
Prints one table whose ratios come from this one run; ``scripts/bench_grads.py`` imports
``projection_rows`` and ``format_table`` for its own report.

Columns: ``rademacher`` / ``gaussian`` / ``sparse`` are g2is_jax.projection under jit (the time
includes generating the matrix blocks, as in real use); ``traker`` is TRAK's ``BasicProjector``
(PyPI ``traker``, PyTorch on CPU, Rademacher, unscaled) at the same P and d. With
``--alternatives`` it also times two designs not chosen for the fast kind, to back that choice:
a count-sketch with fully hashed buckets (scatter-add) and a blocked subsampled randomized
Hadamard transform (SRHT).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from g2is_jax.projection import project


def time_call(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after one warm-up (compile) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(batch: int, params: int, seed: int = 0) -> jax.Array:
    """A (batch, params) float32 stand-in for flattened per-example gradients."""
    return jax.random.normal(jax.random.key(seed), (batch, params), jnp.float32)


def bench_kind(x: jax.Array, kind: str, dim: int, *, nnz: int = 4, repeats: int = 3) -> float:
    """Seconds per batch of g2is_jax's projection ``kind``."""
    fn = jax.jit(lambda x: project(x, kind=kind, dim=dim, seed=0, nnz=nnz))
    return time_call(lambda: fn(x), repeats)


def bench_traker(x: np.ndarray, dim: int, *, repeats: int = 1) -> float | str:
    """Seconds per batch of traker's BasicProjector, or why it could not run."""
    try:
        import torch
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        return f"traker unavailable: {type(e).__name__}: {e}"
    grads = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
    proj = BasicProjector(
        grad_dim=grads.shape[1],
        proj_dim=dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=torch.device("cpu"),
    )
    times = []
    for _ in range(repeats):  # no warm-up: nothing is compiled, every call regenerates blocks
        start = time.perf_counter()
        proj.project(grads, model_id=0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- alternatives


def _countsketch_scatter(x: jax.Array, dim: int, nnz: int) -> jax.Array:
    """Count-sketch with independently hashed buckets, by scatter-add (timing prototype)."""
    m, block = dim // nnz, 1 << 16
    n_blocks = -(-x.shape[1] // block)
    xp = jnp.pad(x, ((0, 0), (0, n_blocks * block - x.shape[1])))
    key = jax.random.key(0)

    def body(j, acc):
        xb = lax.dynamic_slice_in_dim(xp, j * block, block, axis=1).T
        words = jax.random.bits(jax.random.fold_in(key, j), (block, nnz), jnp.uint32)
        buckets = (words % m).astype(jnp.int32) + (jnp.arange(nnz) * m)[None, :]
        signs = jnp.where(words >> 31 == 1, -1.0, 1.0)
        upd = (xb[:, None, :] * signs[:, :, None]).reshape(block * nnz, x.shape[0])
        return acc.at[buckets.reshape(-1)].add(upd)

    acc = lax.fori_loop(0, n_blocks, body, jnp.zeros((dim, x.shape[0]), jnp.float32))
    return acc.T / math.sqrt(nnz)


def _blocked_srht(x: jax.Array, dim: int) -> jax.Array:
    """Blocked SRHT: per block of L = 2·dim, signs, Walsh-Hadamard, dim sampled rows, summed."""
    L = 2 * dim
    n_blocks = -(-x.shape[1] // L)
    xp = jnp.pad(x, ((0, 0), (0, n_blocks * L - x.shape[1])))
    key = jax.random.key(0)
    batch = x.shape[0]

    def body(j, acc):
        k = jax.random.fold_in(key, j)
        v = lax.dynamic_slice_in_dim(xp, j * L, L, axis=1) * jax.random.rademacher(k, (L,))[None]
        h = 1
        while h < L:  # in-place butterflies as reshapes
            v = v.reshape(batch, L // (2 * h), 2, h)
            v = jnp.stack([v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]], axis=2)
            h *= 2
        v = v.reshape(batch, L)
        start = jax.random.randint(k, (), 0, L - dim + 1)  # stand-in for a sampled row subset
        return acc + lax.dynamic_slice_in_dim(v, start, dim, axis=1)

    acc = lax.fori_loop(0, n_blocks, body, jnp.zeros((batch, dim), jnp.float32))
    return acc / math.sqrt(dim)


# ----------------------------------------------------------------------------- table


def projection_rows(
    params: int,
    dim: int,
    batch: int,
    *,
    kinds: Sequence[str] = ("rademacher", "sparse"),
    nnz: int = 4,
    traker: bool = True,
    alternatives: bool = False,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Time every method on one (batch, params) input; rows of {method, seconds, records_per_s}."""
    x = random_batch(batch, params)
    rows: list[dict[str, Any]] = []

    def add(method: str, seconds: float | str) -> None:
        if isinstance(seconds, str):
            rows.append({"method": method, "seconds": None, "records_per_s": None, "note": seconds})
        else:
            rows.append({"method": method, "seconds": seconds, "records_per_s": batch / seconds})
        print(f"  timed {method}", file=sys.stderr, flush=True)

    for kind in kinds:
        reps = 1 if kind in ("rademacher", "gaussian") else repeats  # dense: seconds per call
        label = f"{kind} (nnz={nnz})" if kind == "sparse" else kind
        add(label, bench_kind(x, kind, dim, nnz=nnz, repeats=reps))
    if alternatives:
        cs = jax.jit(lambda x: _countsketch_scatter(x, dim, nnz))
        add(f"alt: count-sketch scatter (nnz={nnz})", time_call(lambda: cs(x), repeats))
        srht = jax.jit(lambda x: _blocked_srht(x, dim))
        add("alt: blocked SRHT", time_call(lambda: srht(x), repeats))
    if traker:
        add("traker BasicProjector", bench_traker(np.asarray(x), dim))
    return rows


def format_table(rows: list[dict[str, Any]], baseline: str = "rademacher") -> str:
    """A Markdown table with each method's speed relative to ``baseline``."""
    base = next((r["records_per_s"] for r in rows if r["method"] == baseline), None)
    lines = [
        "| method | s / batch | records/s | vs dense rademacher |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["records_per_s"] is None:
            lines.append(f"| {r['method']} | - | - | skipped: {r['note']} |")
            continue
        ratio = f"{r['records_per_s'] / base:.1f}x" if base else "-"
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['records_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine the numbers came from."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="P, flattened size")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--nnz", type=int, default=4)
    parser.add_argument("--kinds", default="rademacher,sparse", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-traker", action="store_true")
    parser.add_argument("--alternatives", action="store_true")
    args = parser.parse_args(argv)
    rows = projection_rows(
        args.params,
        args.dim,
        args.batch,
        kinds=args.kinds.split(","),
        nnz=args.nnz,
        traker=not args.no_traker,
        alternatives=args.alternatives,
        repeats=args.repeats,
    )
    print(f"Projection, P = {args.params:,}, d = {args.dim}, batch = {args.batch}; {machine()}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
