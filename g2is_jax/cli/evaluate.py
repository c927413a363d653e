"""`g2is evaluate`: per-record loss (and greedy exact match) of a model on a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from g2is_jax.errors import G2ISError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="loss per record (and exact match with --generate) of a model on a dataset",
        description="Scores every record of --data with the model (plus an optional LoRA "
        "adapter) and writes one JSON line per record to --out: {index, id, loss, n_tokens} "
        "and, with --generate, {prediction, exact_match} from greedy decoding. Prints a "
        "summary line.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), a .gguf file, or a Hugging Face checkpoint dir")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory (adapter_config.json + "
                   "adapter_model.safetensors) or a g2is checkpoint RUN/checkpoints/<epoch>")
    p.add_argument("--data", required=True, help="JSON/JSONL/Parquet instruction records")
    p.add_argument("--out", required=True, help="output JSONL, one line per record")
    p.add_argument("--generate", action="store_true", help="greedy-decode answers and report "
                   "exact match against the reference answer")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's weights and compute (bfloat16: float32 softmax, loss)")
    p.set_defaults(func=run)


def load_adapted_model(model_spec: str, adapter: str | None, dtype: str = "float32"):
    """(model, tokenizer) with `adapter` applied: a PEFT dir or a g2is training checkpoint."""
    from g2is_jax.models.loading import load_model

    model, tokenizer = load_model(model_spec, dtype=dtype)
    if adapter:
        path = Path(adapter)
        if (path / "adapter_config.json").exists():
            from g2is_jax.models.peft import load_peft_adapter

            model = load_peft_adapter(model, path)
        elif (path / "meta").exists() and (path / "state").exists():
            from g2is_jax.train import load_checkpoint

            model, _, _ = load_checkpoint(model, path)
        else:
            raise G2ISError(f"--adapter {adapter}: neither a PEFT adapter directory "
                            "(adapter_config.json) nor a g2is checkpoint (meta/, state/)")
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from g2is_jax.data import load_records
    from g2is_jax.evaluate import evaluate_records
    from g2is_jax.io import atomic_open, check_output_file

    if args.batch_size < 1 or args.max_length < 2 or args.max_new_tokens < 1:
        raise G2ISError("--batch-size, --max-new-tokens must be ≥ 1 and --max-length ≥ 2")
    if args.limit is not None and args.limit < 1:
        raise G2ISError(f"--limit must be ≥ 1, got {args.limit}")
    out = check_output_file(args.out, "--out")  # before any work
    records = load_records(args.data, limit=args.limit)
    model, tokenizer = load_adapted_model(args.model, args.adapter, args.dtype)
    res = evaluate_records(model, tokenizer, records, batch_size=args.batch_size,
                           max_length=args.max_length, generate_answers=args.generate,
                           max_new_tokens=args.max_new_tokens)
    with atomic_open(out, "w") as f:  # nothing half-written
        for i, rec in enumerate(records):
            row = {"index": i, "id": rec.id, "loss": float(res.loss[i]),
                   "n_tokens": int(res.n_tokens[i])}
            if res.predictions is not None:
                row["prediction"] = res.predictions[i]
                row["exact_match"] = bool(res.exact_match[i])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = res.summary()
    print(json.dumps({"summary": summary, "out": str(out)}))
    return 0
