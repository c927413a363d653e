"""Per-example gradient throughput on the default model, in records/s, measured in one run.

Run: ``python scripts/bench_grads.py [--model smollm2-135m] [--batch 8] [--length 128]
[--rank 128] [--records 16] [--no-torch] [--no-projection]``.

On the same records, padded to the same bucket, it times
  (a) the batched mean gradient of the batch (one jax.grad of the mean loss): the limit, 1.0;
  per-example gradients: jax.vmap(jax.grad) over the batch (what `g2is grads` runs);
  (b) a Python loop of single-record jax.grad (jitted, one record per call);
  (c) the PyTorch loop LESS runs: transformers + peft, batch size 1, loss.backward();
and then the projection table of scripts/bench_projection.py at P = the LoRA size, d = --dim.
Ratios are computed from this one run on this one machine.
"""

from __future__ import annotations

import argparse
import sys
import time
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


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="the padded bucket length")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
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
    b = args.batch
    print(f"model {args.model}: LoRA r={args.rank} on q,k,v,o, P = {n_params:,}; batch {b} "
          f"padded to {args.length}; {machine()}", flush=True)

    loss1 = completion_loss(graphdef)
    mean_grad = jax.jit(jax.grad(lambda lo: jnp.mean(batch_nll(graphdef, lo, base, batch))))
    per_ex = jax.jit(per_example_grads(loss1))
    single = jax.jit(jax.grad(loss1))
    rows = []
    t_mean = timed(lambda: mean_grad(lora), args.repeats)
    rows.append(("(a) batched mean gradient (limit)", b / t_mean))
    t_vmap = timed(lambda: per_ex(lora, base, batch), args.repeats)
    rows.append(("per-example: vmap(grad), g2is_jax", b / t_vmap))
    exs = [{k: v[i] for k, v in batch.items()} for i in range(b)]

    def loop():
        return [single(lora, base, e) for e in exs]

    t_loop = timed(loop, max(1, args.repeats - 1))
    rows.append(("(b) Python loop of jax.grad, 1 record", b / t_loop))
    if not args.no_torch:
        rows.append(("(c) PyTorch+peft loop, batch size 1 (LESS)",
                     b / torch_loop_seconds(model, lora_cfg, batch, args.repeats)))
    vm = b / t_vmap
    print("\n| per-example gradients | records/s | per-example vmap vs this |")
    print("|---|---:|---:|")
    for name, rps in rows:
        print(f"| {name} | {rps:.2f} | {vm / rps:.2f}x |")
    print(f"\nper-example / batched-mean throughput: {vm / rows[0][1]:.2f} (target ≥ 0.7)")
    if not args.no_torch:
        print(f"per-example vmap / PyTorch loop: {vm / rows[-1][1]:.2f}x (target ≥ 3)")
    if not args.no_projection:
        print(f"\nprojection at P = {n_params:,}, d = {args.dim}, batch {b}:")
        print(format_table(projection_rows(n_params, args.dim, b, repeats=args.repeats)))


def torch_loop_seconds(model, lora_cfg, batch, repeats: int) -> float:
    import peft
    import torch
    import transformers

    from g2is_jax.models.convert import hf_tensors

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = transformers.AutoConfig.for_model(**model.config.to_hf())
    tm = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in hf_tensors(model).items()},
                       strict=False)
    pm = peft.get_peft_model(tm, peft.LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=0.0,
        target_modules=[f"{m}_proj" for m in lora_cfg.target_modules]))
    ids = torch.from_numpy(np.asarray(batch["input_ids"])).long()
    am = torch.from_numpy(np.asarray(batch["attention_mask"])).long()
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

    once()
    times = []
    for _ in range(max(1, repeats - 1)):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


if __name__ == "__main__":
    main()
