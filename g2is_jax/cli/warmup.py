"""`g2is warmup`: LESS's warmup LoRA training on a seeded fraction of the pool."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    p.add_argument("--lora-rank", type=int, help="LoRA rank; without --lora-alpha, alpha "
                   "follows it so the preset's scaling alpha/rank stays (less: r=8 gives "
                   "alpha 32)")
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma list of q,k,v,o,gate,up,down")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's weights and compute (bfloat16: float32 softmax, loss, "
                   "LoRA factors and Adam moments)")


# Library parameter names in messages -> this command's flags.
_FLAGS = {"learning_rate": "--lr", "lora.alpha": "--lora-alpha", "lora_alpha": "--lora-alpha",
          "lora_rank": "--lora-rank", "lora_dropout": "--lora-dropout",
          "lora_targets": "--lora-targets", "warmup_ratio": "--warmup-ratio",
          "weight_decay": "--weight-decay", "batch_size": "--batch-size",
          "grad_accum": "--grad-accum", "max_length": "--max-length", "fraction": "--fraction",
          "epochs": "--epochs", "seed": "--seed", "schedule": "--schedule"}


def flag_names(exc: G2ISError) -> G2ISError:
    """The same error with a leading library parameter name replaced by its flag."""
    text = str(exc)
    for name in sorted(_FLAGS, key=len, reverse=True):
        if text.startswith(name + " "):
            return G2ISError(_FLAGS[name] + text[len(name):])
    return exc


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig of the flags: `resolve_train_config`, the resolution `g2is run` uses."""
    from g2is_jax.train import TRAIN_OVERRIDES, resolve_train_config

    try:
        return resolve_train_config(args.preset, **{k: getattr(args, k, None)
                                                    for k in TRAIN_OVERRIDES})
    except G2ISError as exc:
        raise flag_names(exc) from None


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
    from g2is_jax.fingerprint import model_fingerprint, model_path
    from g2is_jax.io import check_output_dir
    from g2is_jax.models.loading import load_model
    from g2is_jax.store import file_sha256
    from g2is_jax.train import train_lora

    cfg = train_config_from_args(args)
    check_output_dir(args.out, "--out")
    records = load_records(args.data)
    data = Path(args.data)
    # Content, not the text typed: `dir/` and `dir` are one model; a relative path typed
    # elsewhere, or weights replaced in place, are another (refused on resume).
    run_info = {"model": str(model_path(args.model)),
                "model_fingerprint": model_fingerprint(args.model),
                "data": str(data.resolve()) if data.is_file() else str(args.data),
                "data_sha256": file_sha256(data) if data.is_file() else None}
    if args.dtype != "float32":  # absent for float32, as in runs made before the option
        run_info["dtype"] = args.dtype
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    return train_lora(model, tokenizer, records, args.out, cfg, run_info=run_info)


def run(args: argparse.Namespace) -> int:
    res = train_from_args(args)
    print(json.dumps({"checkpoints": [str(c) for c in res.checkpoints],
                      "epoch_mean_lr": res.epoch_lrs, "epoch_loss": res.losses}))
    return 0
