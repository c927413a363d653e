"""The sharded walk against the one-device walk, in one run: same selection, time per walk step.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python scripts/bench_scale.py --n 50000 --dim 1024 --ratio 0.01

On simulated CPU devices every "device" shares the same cores, so the ratio measures what the
sharded program costs over the plain one (its all-reduces, per-device loops), not a speed-up.
Prints one line per configuration and the ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from g2is_jax import sharding
from g2is_jax.select import g2is_select


def clustered(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = max(8, n // 100)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    t = centres[rng.integers(0, k, n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    v = centres[:4].repeat(4, 0) + 0.5 * rng.standard_normal((16, d)).astype(np.float32)
    return t.astype(np.float32), v.astype(np.float32)


def timed(t, v, ratio, mesh, repeats: int = 2):
    g2is_select(t, v, ratio=ratio, mesh=mesh)  # compile
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = g2is_select(t, v, ratio=ratio, mesh=mesh)
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.01)
    args = ap.parse_args()
    t, v = clustered(args.n, args.dim)
    one, s1 = timed(t, v, args.ratio, None)
    mesh = sharding.make_mesh()
    many, sn = timed(t, v, args.ratio, mesh)
    steps = len(one.indices)
    same = one.to_json() == many.to_json()
    print(f"N={args.n} d={args.dim} ratio={args.ratio}: {steps} rows selected, identical={same}")
    print(f"  1 device : {s1:.2f} s  ({1e3 * s1 / steps:.2f} ms per step)")
    print(f"  {jax.device_count()} devices: {sn:.2f} s  ({1e3 * sn / steps:.2f} ms per step)")
    print(f"  sharded / one device: {sn / s1:.2f}x")


if __name__ == "__main__":
    main()
