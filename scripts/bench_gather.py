"""The network gather of `g2is grads --gather network` on loopback: time and memory per bound.

    JAX_PLATFORMS=cpu python scripts/bench_gather.py --rows 5000 --dim 8192 --chunk-mb 8 64

Starts two processes (one CPU device each, `jax.distributed` with gloo on 127.0.0.1). Each
writes `--rows` random float32 rows to a store on its own folder, then for each chunk bound both
send their rows to process 0 (`sharding.gather_rows_to_primary`), which writes them into one
store as `g2is grads` does. Process 0 prints, per bound: steps, seconds, MB/s of rows received,
and the growth of its peak resident memory during the gather (VmHWM, reset before each gather
through /proc/self/clear_refs), against the rows' total size.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the process start
        pass


def worker(port: str, pid: int, root: Path, rows: int, dim: int, chunks: list[float]) -> None:
    import jax
    import numpy as np

    from g2is_jax import sharding
    from g2is_jax.featurize import _RowReader
    from g2is_jax.store import open_store

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    mine = root / f"shard-{pid}"
    with open_store(mine, {}, rows, dim) as store:  # written in pieces: no peak from making it
        for s in range(0, rows, 512):
            k = min(512, rows - s)
            store.write(s, np.random.default_rng([pid, s]).standard_normal((k, dim),
                                                                           np.float32))
        store.finalize()
    indices = np.arange(rows, dtype=np.int64) * 2 + pid
    total_mb = 2 * rows * dim * 4 / 2**20
    for mb in chunks:
        reader = _RowReader(mine / "features.npy", rows, dim)
        out = open_store(root / f"out-{mb}", {}, 2 * rows, dim, overwrite=True) \
            if pid == 0 else None
        sink = None if out is None else (lambda i, r, o=out: o.write(i, r, check_finite=False))
        sharding.barrier(f"start-{mb}")
        _reset_peak()
        base, t0 = _peak_mb(), time.perf_counter()
        steps = sharding.gather_rows_to_primary(indices, reader.read, sink, dim=dim,
                                                chunk_bytes=int(mb * 2**20))
        seconds = time.perf_counter() - t0
        grown = _peak_mb() - base
        reader.close()
        if out is not None:
            out.finalize()
            print(f"chunk {mb:g} MiB: {steps} steps, {seconds:.2f} s, "
                  f"{total_mb / seconds:.0f} MB/s, peak RSS +{grown:.0f} MB "
                  f"(rows gathered: {total_mb:.0f} MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5000, help="rows per process")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--chunk-mb", type=float, nargs="+", default=[8, 64])
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # port, process id, folder
    args = ap.parse_args()
    if args.worker:
        port, pid, root = args.worker
        worker(port, int(pid), Path(root), args.rows, args.dim, args.chunk_mb)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--rows", str(args.rows), "--dim", str(args.dim),
               "--chunk-mb", *map(str, args.chunk_mb), "--worker", port]
        procs = [subprocess.Popen([*cmd, str(i), tmp], env=env) for i in range(2)]
        codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a worker failed (exit codes {codes})")


if __name__ == "__main__":
    main()
