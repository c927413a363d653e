"""Per-example gradient throughput on the default model, in records/s, measured in one run.

Run: ``python scripts/bench_grads.py [--model smollm2-135m] [--batch 8] [--length 128]
[--rank 128] [--repeats 3] [--no-torch] [--no-projection]``.

On the same records, padded to the same bucket by `make_batches` (as `g2is grads` does, so the
batch carries the loss-token slots ``target_index`` / ``target_mask``), it times
  (a) the batched mean gradient of the batch (one jax.grad of the mean loss, same loss path:
      LM head at the loss tokens only): the limit for per-example gradients;
  per-example gradients: jax.vmap(jax.grad) over the batch, LM head at the loss tokens only:
      what `g2is grads` runs (`feature_fn` → `per_example_grads(completion_loss)`);
  per-example gradients with the LM head at every position (the batch without its target
      slots): the path before the slots, for comparison;
  (b) a Python loop of single-record jax.grad (jitted, one record per call, loss-token head);
  (c) the PyTorch loop LESS runs: transformers + peft, batch size 1, each record at its own
      length, loss.backward() (full LM head, as transformers computes it);
and then the projection table of scripts/bench_projection.py at P = the LoRA size, d = --dim.
The rows are timed round-robin (one call of each per round, median over rounds), so a change in
the machine's load during the run falls on every row alike. Ratios come from this one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_projection import format_table, machine, projection_rows  # noqa: E402

from g2is_jax.data import build_pool, encode_records, make_batches  # noqa: E402
from g2is_jax.gradients import per_example_grads  # noqa: E402
from g2is_jax.models.config import LoraConfig  # noqa: E402
from g2is_jax.models.llama import with_lora  # noqa: E402
from g2is_jax.models.loading import load_model  # noqa: E402
from g2is_jax.models.lora import batch_nll, completion_loss, count_params, split_lora  # noqa


def round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, after one warm-up (compile) call of each; one call
    of every fn per round, so load changes during the run hit all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="the padded bucket length")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-loop", action="store_true", help="skip (b)")
    ap.add_argument("--no-projection", action="store_true")
    args = ap.parse_args(argv)

    base_model, tok = load_model(args.model)
    lora_cfg = LoraConfig(rank=args.rank, alpha=4.0 * args.rank, dropout=0.0)
    model = with_lora(base_model, lora_cfg, seed=0)
    graphdef, base, lora = split_lora(model)
    # Non-zero B, as after warmup, so every factor has a gradient.
    leaves, tdef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree_util.tree_unflatten(
        tdef, [x + 0.01 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    n_params = count_params(lora)

    records = build_pool(4 * args.batch, seed=0)
    enc, _ = encode_records(records, tok, max_length=args.length, progress=False)
    batch = make_batches(enc[: args.batch], batch_size=args.batch, buckets=(args.length,),
                         pad_id=tok.pad_token_id, order="input")[0].arrays()
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    full_head = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    b = args.batch
    n_tok = int(batch["attention_mask"].sum())
    n_loss = int(batch["target_mask"].sum())
    print(f"model {args.model}: LoRA r={args.rank} on q,k,v,o, P = {n_params:,}; batch {b} "
          f"padded to {args.length} ({n_tok} real tokens, {n_loss} loss tokens, "
          f"K = {batch['target_index'].shape[1]} loss slots per row); {machine()}", flush=True)

    loss1 = completion_loss(graphdef)
    # base and batch are arguments, not closed-over constants (XLA would fold them).
    mean_grad = jax.jit(jax.grad(lambda lo, ba, x: jnp.mean(batch_nll(graphdef, lo, ba, x))))
    per_ex = jax.jit(per_example_grads(loss1))
    single = jax.jit(jax.grad(loss1))
    exs = [{k: v[i] for k, v in batch.items()} for i in range(b)]
    fns: dict[str, Callable[[], object]] = {
        "(a) batched mean gradient, loss-token head (the limit)":
            lambda: mean_grad(lora, base, batch),
        "per-example: vmap(grad), loss-token head (g2is grads)":
            lambda: per_ex(lora, base, batch),
        "per-example: vmap(grad), full LM head (before)":
            lambda: per_ex(lora, base, full_head),
    }
    if not args.no_loop:
        fns["(b) Python loop of jax.grad, 1 record"] = lambda: [single(lora, base, e)
                                                                for e in exs]
    if not args.no_torch:
        fns["(c) PyTorch+peft loop, batch size 1 (LESS)"] = torch_loop(model, lora_cfg, batch)
    load = os.getloadavg()[0]
    secs = round_robin(fns, args.repeats)
    load = max(load, os.getloadavg()[0])
    rps = {name: b / t for name, t in secs.items()}
    names = list(rps)
    vm = rps[names[1]]
    print("\n| per-example gradients | records/s | per-example vmap vs this |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {rps[name]:.2f} | {vm / rps[name]:.2f}x |")
    print(f"\nper-example / batched-mean throughput: {vm / rps[names[0]]:.2f} (target ≥ 0.7)")
    print(f"loss-token head / full LM head, per-example: {vm / rps[names[2]]:.2f}x")
    if not args.no_torch:
        print(f"per-example vmap / PyTorch loop: {vm / rps[names[-1]]:.2f}x (target ≥ 3)")
    busy = load > (os.cpu_count() or 1)
    print(f"1-minute load average during the run: up to {load:.1f} on {os.cpu_count()} CPUs"
          + ("; the machine was busy: timings are unreliable, (c) most of all (PyTorch's "
             "OpenMP threads spin-wait when the cores are shared)" if busy else ""))
    if not args.no_projection:
        print(f"\nprojection at P = {n_params:,}, d = {args.dim}, batch {b}:")
        print(format_table(projection_rows(n_params, args.dim, b, repeats=args.repeats)))


def torch_loop(model, lora_cfg, batch) -> Callable[[], None]:
    """LESS's loop as a callable: transformers + peft, one record at a time at its own length."""
    import peft
    import torch
    import transformers

    from g2is_jax.models.convert import hf_tensors

    cfg = transformers.AutoConfig.for_model(**model.config.to_hf())
    tm = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in hf_tensors(model).items()},
                       strict=False)
    pm = peft.get_peft_model(tm, peft.LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=0.0,
        target_modules=[f"{m}_proj" for m in lora_cfg.target_modules]))
    ids = torch.from_numpy(np.array(batch["input_ids"])).long()
    am = torch.from_numpy(np.array(batch["attention_mask"])).long()
    lm = np.asarray(batch["loss_mask"])
    params = [p for n, p in pm.named_parameters() if p.requires_grad]

    def once():
        # LESS feeds each record at its own length (no padding).
        for i in range(ids.shape[0]):
            n = int(am[i].sum())
            labels = ids[i:i + 1, :n].clone()
            labels[0, lm[i, :n] == 0] = -100
            pm.zero_grad()
            pm(input_ids=ids[i:i + 1, :n], labels=labels).loss.backward()
            torch.cat([p.grad.reshape(-1) for p in params])

    return once


if __name__ == "__main__":
    main()
