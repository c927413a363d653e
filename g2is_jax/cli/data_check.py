"""`g2is data-check D`: validate an instruction dataset and describe it.

Reads every row (all problems are listed, not only the first), prints counts per format and per
domain/kind/dataset field, and, with --model, token-length statistics, truncations and records
left with no loss token. Exits 0 when the dataset is usable, 2 with the list of problems when not.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from g2is_jax.errors import G2ISError

_MAX_SHOWN = 20
_META_KEYS = ("dataset", "domain", "kind")  # meta fields worth a count when present


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "data-check",
        help="validate a dataset and print formats, token lengths, truncations, problems",
        description=(
            "Validate an instruction dataset (JSON Lines, JSON, Parquet, or a hub name) in the "
            "messages, alpaca, sharegpt or prompt/completion format. Prints counts per format, "
            "token-length statistics and truncations (with --model), and every problem found. "
            "Exit status 2 when the dataset has problems."
        ),
    )
    p.add_argument("data", metavar="D", help="dataset file (.jsonl, .json, .parquet) or hub name")
    p.add_argument(
        "--model",
        metavar="M",
        help="model whose tokenizer and chat template to use for token statistics "
        "(a name such as smollm2-135m, an HF directory or a GGUF file); "
        "without it token statistics are skipped",
    )
    p.add_argument(
        "--max-length",
        metavar="L",
        type=_positive_int,
        default=2048,
        help="truncation length in tokens (default: 2048)",
    )
    p.add_argument("--split", default="train", help="split for hub datasets (default: train)")
    p.set_defaults(func=run)


def _load_tokenizer(model: str) -> Any:
    # Imported lazily: the model stack is heavy and not needed without --model.
    from g2is_jax.models.loading import load_tokenizer

    return load_tokenizer(model)


def _counts(title: str, counter: Counter) -> str:
    parts = [f"{key} {n}" for key, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"{title}: " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from g2is_jax.data import encode_records, scan_records

    records, problems = scan_records(args.data, split=args.split)
    print(f"{args.data}: {len(records)} good record(s), {len(problems)} bad")
    if records:
        print(_counts("formats", Counter(r.format for r in records)))
        for key in _META_KEYS:
            values = Counter(str(r.meta[key]) for r in records if key in r.meta)
            if values:
                print(_counts(key, values))
        turns = Counter(sum(m.role == "assistant" for m in r.messages) for r in records)
        print(_counts("assistant turns per record", turns))
        ids = Counter(r.id for r in records)
        duplicates = [i for i, n in ids.items() if n > 1]
        if duplicates:
            shown = ", ".join(duplicates[:10])
            print(f"warning: {len(duplicates)} duplicated id(s): {shown}")

    if records and args.model:
        tokenizer = _load_tokenizer(args.model)
        _, report = encode_records(
            records, tokenizer, max_length=args.max_length, progress=True, check=False
        )
        print(report.summary())
        if report.empty_ids:
            shown = ", ".join(report.empty_ids[:_MAX_SHOWN])
            problems.append(
                f"{len(report.empty_ids)} record(s) have no loss tokens after truncation to "
                f"{args.max_length} tokens: {shown}. Fix: raise --max-length"
            )
    elif records:
        print("tokens: skipped (no --model given; pass --model M for token lengths and truncation)")

    if len(problems) == 1:
        raise G2ISError(f"1 problem in {args.data}: {problems[0]}")
    if problems:
        listed = "\n  ".join(problems[:_MAX_SHOWN])
        more = (
            f"\n  ... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        )
        raise G2ISError(f"{len(problems)} problem(s) in {args.data}:\n  {listed}{more}")
    print("ok")
    return 0
