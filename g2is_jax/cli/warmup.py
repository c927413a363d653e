"""`g2is warmup`: LESS's warmup LoRA training on a seeded fraction of the pool."""

from __future__ import annotations

import argparse
import dataclasses
import json

from g2is_jax.errors import G2ISError


def add_train_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    """Flags shared by `warmup` and `train`: a preset, then per-field overrides."""
    from g2is_jax.train import TRAIN_PRESETS

    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), a .gguf file, or a Hugging Face checkpoint dir")
    p.add_argument("--data", required=True, help="JSON/JSONL/Parquet instruction records")
    p.add_argument("--out", required=True, help="run directory (checkpoints/<epoch>/ ...)")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default=default_preset,
                   help=f"named defaults (default {default_preset}); flags below override")
    p.add_argument("--fraction", type=float, help="fraction of --data to train on (seeded)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--schedule", choices=["linear", "cosine"])
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int, help="records per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma list of q,k,v,o,gate,up,down")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def train_config_from_args(args: argparse.Namespace):
    from g2is_jax.train import TRAIN_PRESETS

    cfg = TRAIN_PRESETS[args.preset]
    fields = ("fraction", "epochs", "learning_rate", "schedule", "warmup_ratio",
              "weight_decay", "batch_size", "grad_accum", "max_length", "seed")
    over = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    lora_over = {k: v for k, v in {
        "rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
        "target_modules": tuple(t.strip() for t in args.lora_targets.split(","))
        if args.lora_targets else None}.items() if v is not None}
    lora = dataclasses.replace(cfg.lora, **lora_over)
    try:
        return dataclasses.replace(cfg, **over, lora=lora)
    except TypeError as exc:  # pragma: no cover - argparse types keep this out
        raise G2ISError(str(exc)) from exc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "warmup",
        help="warmup LoRA training on a seeded fraction of the pool (LESS step 1)",
        description="Trains fresh LoRA adapters on a seeded random fraction of --data (LESS: "
        "5%%, 4 epochs, AdamW lr 2e-5, linear decay, 3%% warmup, effective batch 128, r=128, "
        "alpha=512, dropout 0.1 on q,k,v,o) and writes an orbax checkpoint per epoch to "
        "OUT/checkpoints/<epoch> with the LoRA params, Adam moments, step, the epoch's mean "
        "learning rate, the configs and the ids trained on. Re-run the same command to resume.",
    )
    add_train_args(p, "less")
    p.set_defaults(func=run)


def train_from_args(args: argparse.Namespace):
    """Load --data and --model, train as the flags say; the `TrainResult`."""
    from g2is_jax.data import load_records
    from g2is_jax.models.loading import load_model
    from g2is_jax.train import train_lora

    cfg = train_config_from_args(args)
    records = load_records(args.data)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    return train_lora(model, tokenizer, records, args.out, cfg,
                      run_info={"model": str(args.model), "data": str(args.data)})


def run(args: argparse.Namespace) -> int:
    res = train_from_args(args)
    print(json.dumps({"checkpoints": [str(c) for c in res.checkpoints],
                      "epoch_mean_lr": res.epoch_lrs, "epoch_loss": res.losses}))
    return 0
