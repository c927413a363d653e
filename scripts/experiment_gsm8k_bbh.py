"""The method comparison on real task data: GSM8K and BIG-Bench Hard, through `g2is run`.

Run: ``python scripts/experiment_gsm8k_bbh.py [--data ../shared/data] [--target gsm8k |
bbh:<task>] [--out runs/real] [--pool-size 400] [--methods g2is,less,random] [--ratios 0.05]
[--seeds 0] [--set KEY=VALUE ...]``

The pool mixes the sources evenly: GSM8K's train split and each of the BBH task files (22
sources). The target's validation examples (`--n-dev`) and test examples (`--n-test`) are drawn
first and kept out of the pool: for GSM8K from its train and test splits, for a BBH task from
its one file. Records longer than --max-length tokens are left out (a cut answer would train
and score on part of the answer). Every pool record carries `meta.domain` (`gsm8k` or
`bbh/<task>`), so the report also scores each selection against its source (precision = the
share taken from the target's own source). BBH records keep the benchmark's canary string in
`meta.canary`.

The derived files are written to OUT/data (never into the repository); the data directory is
only read. Without it the script says so and exits 0 (nothing to run on a fresh machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SYSTEM = "Answer the question. End with the final answer."


def _gsm8k(path: Path, split: str) -> list[dict]:
    rows = []
    with open(path / f"{split}.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                d = json.loads(line)
                rows.append({"id": f"gsm8k-{split}-{i:05d}", "question": d["question"],
                             "answer": d["answer"], "domain": "gsm8k"})
    return rows


def _bbh(path: Path, task: str) -> list[dict]:
    doc = json.loads((path / f"{task}.json").read_text(encoding="utf-8"))
    return [{"id": f"bbh-{task}-{i:04d}", "question": e["input"], "answer": e["target"],
             "domain": f"bbh/{task}", "canary": doc.get("canary")}
            for i, e in enumerate(doc["examples"])]


def _record(row: dict) -> dict:
    """A `messages` record; meta.answer is the exact-match reference."""
    out = {"id": row["id"],
           "messages": [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": row["answer"]}],
           "domain": row["domain"], "kind": "clean", "answer": row["answer"]}
    if row.get("canary"):
        out["canary"] = row["canary"]
    return out


def _fitting(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """The rows whose whole chat-formatted record fits in max_length tokens (so no completion
    is cut: a truncated record would train and score on part of its answer)."""
    from g2is_jax.data.formats import convert_record
    from g2is_jax.data.tokenize import encode_record

    keep = []
    for row in rows:
        rec = convert_record(_record(row), index=0, source=row["id"])
        if len(encode_record(rec, tokenizer, max_length=1 << 20).input_ids) <= max_length:
            keep.append(row)
    return keep


def build_files(data: Path, out: Path, *, target: str, pool_size: int, n_dev: int,
                n_test: int, seed: int, tokenizer=None, max_length: int | None = None
                ) -> dict[str, Path]:
    """Write OUT/pool.jsonl, OUT/dev.jsonl, OUT/test.jsonl; return their paths. With a tokenizer
    and max_length, records longer than max_length tokens are left out everywhere."""
    rng = np.random.default_rng(seed)
    tasks = sorted(p.stem for p in (data / "bbh").glob("*.json"))

    def fit(rows: list[dict]) -> list[dict]:
        return rows if tokenizer is None else _fitting(rows, tokenizer, max_length)

    sources: dict[str, list[dict]] = {"gsm8k": fit(_gsm8k(data / "gsm8k", "train"))}
    for t in tasks:
        sources[f"bbh/{t}"] = fit(_bbh(data / "bbh", t))
    if target == "gsm8k":
        key = "gsm8k"
        train = sources[key]
        order = rng.permutation(len(train))
        dev = [train[i] for i in order[:n_dev]]
        sources[key] = [train[i] for i in order[n_dev:]]
        test_rows = fit(_gsm8k(data / "gsm8k", "test"))
        test = [test_rows[i] for i in np.sort(rng.permutation(len(test_rows))[:n_test])]
    elif target.startswith("bbh:"):
        key = "bbh/" + target[4:]
        if key not in sources:
            raise SystemExit(f"unknown BBH task {target[4:]!r}; have: {', '.join(tasks)}")
        rows = sources[key]
        order = rng.permutation(len(rows))
        if n_dev + n_test >= len(rows):
            raise SystemExit(f"{key} has {len(rows)} examples: ask for fewer than "
                             f"{len(rows)} dev + test")
        dev = [rows[i] for i in order[:n_dev]]
        test = [rows[i] for i in order[n_dev:n_dev + n_test]]
        sources[key] = [rows[i] for i in order[n_dev + n_test:]]
    else:
        raise SystemExit(f"--target must be gsm8k or bbh:<task>, got {target!r}")
    names = sorted(sources)
    share = [pool_size // len(names) + (i < pool_size % len(names)) for i in range(len(names))]
    pool = []
    for name, k in zip(names, share):
        rows = sources[name]
        pool += [rows[i] for i in np.sort(rng.permutation(len(rows))[:min(k, len(rows))])]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("pool", pool), ("dev", dev), ("test", test)):
        p = out / f"{name}.jsonl"
        text = "".join(json.dumps(_record(r), ensure_ascii=False) + "\n" for r in rows)
        if not p.exists() or p.read_text(encoding="utf-8") != text:  # keep the hash stable
            p.write_text(text, encoding="utf-8")
        paths[name] = p
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder with gsm8k/ and bbh/ (default ../shared/data)")
    ap.add_argument("--target", default="gsm8k", help="gsm8k or bbh:<task>")
    ap.add_argument("--out", type=Path, default=Path("runs/real"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool-size", type=int, default=400)
    ap.add_argument("--n-dev", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--methods", default="g2is,less,random")
    ap.add_argument("--ratios", default="0.05")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data split and pool")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="any `g2is run` config override (repeat)")
    args = ap.parse_args(argv)
    if not (args.data / "gsm8k" / "train.jsonl").is_file() or not (args.data / "bbh").is_dir():
        print(f"skipped: no GSM8K/BBH files under {args.data} (pass --data)")
        return 0

    from g2is_jax.models.loading import load_tokenizer
    from g2is_jax.pipeline import run_pipeline
    from g2is_jax.report import format_report
    from g2is_jax.runconfig import load_run_config

    files = build_files(args.data, args.out / "data", target=args.target,
                        pool_size=args.pool_size, n_dev=args.n_dev, n_test=args.n_test,
                        seed=args.seed, tokenizer=load_tokenizer(args.model),
                        max_length=args.max_length)
    domain = "gsm8k" if args.target == "gsm8k" else "bbh/" + args.target[4:]
    overrides = [
        f"model={args.model}", f"max_length={args.max_length}",
        f"data.pool={files['pool']}", f"data.dev={files['dev']}", f"data.test={files['test']}",
        f"data.target_domain={domain}",
        "warmup.preset=cpu", "warmup.fraction=0.1", "warmup.epochs=1", "warmup.batch_size=4",
        "features.projection=sparse", "features.dim=8192", "features.batch_size=4",
        f"select.methods={args.methods}", f"select.ratios={args.ratios}",
        f"select.seeds={args.seeds}", "finetune.preset=cpu-finetune", "finetune.batch_size=4",
        "finetune.lora_rank=8", f"evaluate.max_new_tokens={args.max_new_tokens}",
        "evaluate.batch_size=10", *args.overrides]
    cfg = load_run_config(None, overrides)
    report = run_pipeline(cfg, args.out)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
