"""Benchmark: the JAX selection against the NumPy reference pipeline, ratios from one run.

For each (N, d, ratio, data kind) it runs, each in its own subprocess (so peak memory is that
run's own):

* jax-onthefly: `g2is_select(mode="onthefly")`, no graph;
* jax-graph: `knn_graph` then the walk in graph mode;
* numpy-ref: a blocked NumPy kNN graph (gemm per row block, argpartition, sort) and the walk as
  the authors' release runs it (a Python loop per row, per-candidate checks, fallback scans).

It reports "graph" (row normalisation, plus the kNN graph where one is used) and walk times
separately (steady state; compile time in its own column), the
peak memory above the process's level before the timed section (resident memory sampled every
2 ms; the device's own peak where the backend reports one), whether the three selections are
identical, and the walk's memory-bandwidth floor: each selected row
costs one pass over T, so K rows read K × bytes(T); divided by this machine's copy bandwidth,
measured here (STREAM-style, read + write bytes per second, the best of NumPy and a jitted copy).

  python scripts/bench_select.py                       # the issue's grid (long on a CPU)
  python scripts/bench_select.py --sizes 5000,20000 --dims 256 --ratios 0.01 --kinds clustered
  python scripts/bench_select.py --sizes 270000 --dims 8192 --no-reference   # GPU target
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SLACK = 64  # ulps, as in g2is_jax.select.walk


# ---------------------------------------------------------------------------------------------
# Data.


def make_data(kind: str, n: int, d: int, seed: int = 0):
    """float32 (T, V). clustered: 32 topics; low_signal: noise with a faint shared direction."""
    import jax
    import jax.numpy as jnp

    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
    if kind == "clustered":
        centres = jax.random.normal(k1, (32, d))
        labels = jax.random.randint(k2, (n,), 0, 32)
        t = centres[labels] + 1.0 * jax.random.normal(k3, (n, d))
        v = centres[jnp.arange(8) % 2] + 1.0 * jax.random.normal(k4, (8, d))
    elif kind == "low_signal":
        direction = jax.random.normal(k1, (d,))
        t = jax.random.normal(k3, (n, d)) + 0.05 * direction[None, :]
        v = jax.random.normal(k4, (8, d)) * 0.2 + direction[None, :]
        v = v + 0.5 * jax.random.normal(k5, (8, d))
    else:
        raise SystemExit(f"unknown kind {kind}")
    return t.astype(jnp.float32), v.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The NumPy reference pipeline.


def np_unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)


def np_knn(unit: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Blocked top-k by cosine, similarity descending then index ascending."""
    n = unit.shape[0]
    k = min(k, n)
    out = np.empty((n, k), np.int64)
    for s in range(0, n, block):
        sims = unit[s : s + block] @ unit.T
        sims[sims == 0] = 0.0
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def np_walk(unit, comps, budgets, delta, neighbors, graph):
    """The walk as the release runs it, with the library's tie rule and consistency slack."""
    n, d = unit.shape
    rtol = SLACK * np.finfo(unit.dtype).eps
    taken = np.zeros(n, bool)
    out = []

    def abs_cos(vec, k):
        norm = np.linalg.norm(vec)
        return 0.0 if norm <= 1e-10 else abs(float((vec / norm) @ k))

    for comp, budget in zip(comps, budgets, strict=True):
        if budget <= 0:
            continue
        k = comp.astype(unit.dtype)
        sims = unit @ k
        sims[sims == 0] = 0.0
        by_sim = np.lexsort((np.arange(n), -sims))
        free = by_sim[~taken[by_sim]]
        if len(free) == 0:
            break
        anchor = int(free[0])
        rows = np.zeros((budget, d), unit.dtype)
        rows[0] = unit[anchor]
        count, last, s = 1, anchor, unit[anchor].astype(np.float64)
        taken[anchor] = True
        out.append(anchor)
        while count < budget:
            old = abs_cos(s, k)

            def valid(c, s=s, old=old, count=count, rows=rows, k=k):
                if taken[c] or np.any(rows[:count] @ unit[c] < 0):
                    return False
                return abs_cos(s + unit[c], k) >= delta * old * (1 - rtol)

            pick = next((int(c) for c in graph[last][:neighbors] if valid(c)), None)
            if pick is None:
                pick = next((int(c) for c in by_sim if valid(c)), None)
            if pick is None:
                break
            taken[pick] = True
            out.append(pick)
            rows[count] = unit[pick]
            count, last, s = count + 1, pick, s + unit[pick]
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# One measurement (in a subprocess).


def _device_peak() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**20 if peak else None


class PeakRss:
    """Peak resident memory above the starting point, sampled every 2 ms in a thread."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _watch(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def run_one(cfg: dict) -> dict:
    import jax

    from g2is_jax.select import core, g2is_select
    from g2is_jax.select.graph import knn_graph
    from g2is_jax.select.walk import gradient_walk

    t, v = make_data(cfg["kind"], cfg["n"], cfg["d"])
    know = core.core_knowledge(np.asarray(v), pca_variance=0.5)
    total = core.total_budget(cfg["n"], cfg["ratio"])
    budgets = core.allocate_budgets(total, know.weights)
    res: dict = {"pipeline": cfg["pipeline"], "components": len(budgets)}
    if cfg["pipeline"] == "numpy-ref":
        t_np = np.asarray(t)
        del t
        mem = PeakRss().__enter__()
        t0 = time.perf_counter()
        unit = np_unit(t_np)
        graph = np_knn(unit, cfg["neighbors"])
        t1 = time.perf_counter()
        idx = np_walk(unit, know.components, budgets, cfg["delta"], cfg["neighbors"], graph)
        t2 = time.perf_counter()
        res.update(graph_s=t1 - t0, walk_s=t2 - t1, compile_s=0.0)
    else:
        mode = cfg["pipeline"].split("-")[1]
        kw = {"ratio": cfg["ratio"], "delta": cfg["delta"], "neighbors": cfg["neighbors"]}
        c0 = time.perf_counter()
        g2is_select(t, v, mode=mode, **kw)  # compile everything once
        compile_s = time.perf_counter() - c0
        t = np.asarray(t)  # the pool arrives from the host, as from a feature store
        mem = PeakRss().__enter__()
        t0 = time.perf_counter()
        unit, sq = core.prepare_rows(t)
        graph = None
        if mode == "graph":
            graph = knn_graph(unit, cfg["neighbors"], n_rows=cfg["n"], progress=False).indices
        jax.block_until_ready(unit)
        t1 = time.perf_counter()
        out = gradient_walk(
            unit,
            sq,
            know.components,
            budgets,
            n_rows=cfg["n"],
            delta=cfg["delta"],
            neighbors=cfg["neighbors"],
            mode=mode,
            graph=graph,
        )
        t2 = time.perf_counter()
        idx = out.indices
        res.update(graph_s=t1 - t0, walk_s=t2 - t1, compile_s=max(0.0, compile_s - (t2 - t0)))
        res["fallbacks"] = int((out.steps == 2).sum())
    mem.__exit__(None, None, None)
    res["indices"] = [int(i) for i in idx]
    res["peak_rss_mb"] = mem.extra_mb
    res["device_peak_mb"] = _device_peak()
    return res


def copy_bandwidth() -> float:
    """Best of NumPy's and a jitted copy, in (read + write) bytes per second."""
    import jax
    import jax.numpy as jnp

    n = 64 * 2**20 // 4 * 4  # 256 MiB of float32
    src = np.ones(n // 4 * 4, np.float32)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    x = jnp.ones(src.shape, jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    for _ in range(5):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------------------------------------
# Driver.


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="20000,100000", help="pool sizes N, comma separated")
    p.add_argument("--dims", default="1024,8192", help="feature dims d")
    p.add_argument("--ratios", default="0.01,0.05")
    p.add_argument("--kinds", default="clustered,low_signal")
    p.add_argument("--pipelines", default="jax-onthefly,jax-graph,numpy-ref")
    p.add_argument("--no-reference", action="store_true", help="skip numpy-ref (huge sizes)")
    p.add_argument("--delta", type=float, default=0.8)
    p.add_argument("--neighbors", type=int, default=100)
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return

    import jax

    bw = copy_bandwidth()
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write)",
        flush=True,
    )
    pipelines = [x for x in args.pipelines.split(",") if not (args.no_reference and "numpy" in x)]
    rows = []
    for n in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            for ratio in map(float, args.ratios.split(",")):
                for kind in args.kinds.split(","):
                    results = {}
                    for pipe in pipelines:
                        cfg = {
                            "pipeline": pipe,
                            "n": n,
                            "d": d,
                            "ratio": ratio,
                            "kind": kind,
                            "delta": args.delta,
                            "neighbors": args.neighbors,
                        }
                        proc = subprocess.run(
                            [sys.executable, __file__, "--one", json.dumps(cfg)],
                            check=False,
                            capture_output=True,
                            text=True,
                            env=os.environ,
                        )
                        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                        if proc.returncode or not line:
                            print(f"{pipe} N={n} d={d} failed:\n{proc.stderr[-2000:]}")
                            continue
                        results[pipe] = json.loads(line[0][7:])
                    rows.extend(report(n, d, ratio, kind, results, bw))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def report(n, d, ratio, kind, results, bw):
    if not results:
        return []
    ref = results.get("numpy-ref")
    first = next(iter(results.values()))["indices"]
    same = all(r["indices"] == first for r in results.values())
    k = len(first)
    floor = k * n * d * 4 / bw
    print(
        f"\nN={n} d={d} ratio={ratio} {kind}: K={k} selected, identical across pipelines: "
        f"{'yes' if same else 'NO'}; walk bandwidth floor {floor:.2f} s"
    )
    print(
        f"  {'pipeline':13s} {'graph s':>9s} {'walk s':>9s} {'total s':>9s} {'compile s':>9s} "
        f"{'peak MB':>9s} {'walk/floor':>10s} {'vs ref':>7s}"
    )
    rows = []
    for name, r in results.items():
        total = r["graph_s"] + r["walk_s"]
        speed = (ref["graph_s"] + ref["walk_s"]) / total if ref else float("nan")
        peak = r["peak_rss_mb"] if r["device_peak_mb"] is None else r["device_peak_mb"]
        print(
            f"  {name:13s} {r['graph_s']:9.2f} {r['walk_s']:9.2f} {total:9.2f} "
            f"{r['compile_s']:9.2f} {peak:9.0f} {r['walk_s'] / floor:10.2f} {speed:7.2f}"
        )
        if r["indices"] != first:
            diff = next(
                (i for i, (a, b) in enumerate(zip(r["indices"], first)) if a != b),
                min(len(r["indices"]), len(first)),
            )
            print(f"    differs from {next(iter(results))} at position {diff}")
        rows.append(
            dict(
                n=n,
                d=d,
                ratio=ratio,
                kind=kind,
                pipeline=name,
                k=k,
                floor_s=floor,
                identical=same,
                **{x: r[x] for x in r if x not in ("indices", "pipeline")},
            )
        )
    return rows


if __name__ == "__main__":
    main()
