"""`g2is train`: LoRA fine-tuning on a (selected) subset, with a PEFT export of the result."""

from __future__ import annotations

import argparse
import json

from g2is_jax.cli.warmup import add_train_args, train_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="LoRA fine-tuning on a subset (the paper: r=128, alpha=512, cosine, 3 epochs)",
        description="Fine-tunes fresh LoRA adapters on all of --data (e.g. a selected.jsonl "
        "from `g2is select`) with the paper's settings (preset finetune: r=128, alpha=512, "
        "cosine schedule, 3 epochs; cpu-finetune for CPU), writes an orbax checkpoint per epoch "
        "to OUT/checkpoints/<epoch> and the final adapter in PEFT format to OUT/adapter "
        "(loadable by peft, LLaMA-Factory, vLLM, and `g2is evaluate --adapter`). Re-run the "
        "same command to resume.",
    )
    add_train_args(p, "finetune")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from g2is_jax.models.peft import save_peft_adapter

    res = train_from_args(args)
    adapter = save_peft_adapter(res.model, Path(args.out) / "adapter",
                                base_model_name_or_path=str(args.model))
    print(json.dumps({"adapter": str(adapter), "checkpoints": [str(c) for c in res.checkpoints],
                      "epoch_loss": res.losses}))
    return 0
