"""Does G2IS beat LESS? Several targets, two pool settings, several fine-tune seeds, on real data.

Run (the README's table comes from this command, on the default sizes):

    python scripts/experiment_gsm8k_bbh.py --out runs/eval

Data (from ../shared/data, never copied into the project; derived files go to OUT/data):

* targets (default): GSM8K and the BIG-Bench Hard tasks sports_understanding (yes/no),
  hyperbaton and snarks (two options each): binary-answer tasks where a 135M model's accuracy
  can move. Validation examples per target as few-shot prompts use them (LESS takes 3 per BBH
  task; GSM8K's usual prompt has 8), a test split, and the target's own training split;
* the general pool: `--pool-size` records drawn evenly from every other BBH task (no target's
  data: the paper's general-pool setting). The "with-target" setting adds the target's own
  training split (`--n-train` records) to it;
* records longer than `--max-length` tokens are left out everywhere (a cut answer would train
  and score on part of the answer). Every record carries `meta.domain` (so the report scores
  each selection by source) and BBH rows keep the benchmark's canary string.

Pipeline (`g2is run` with [[targets]]): a warm-up LoRA on a sample of the general pool long
enough for gradient conflicts to appear (default 2 epochs of LESS's 5% of the pool, batch 2: 100
optimizer steps; the report's diagnostics show whether they did), Adam features of the pool and SGD
features of each target's validation rows at the last checkpoint, Rademacher projection (as
LESS), selection at ratio 0.01 by every method, LoRA fine-tunes on each selection with several
seeds, test loss and exact match, paired differences with bootstrap intervals and a verdict per
target.

Without the data folder the script says so and exits 0 (nothing to run on a fresh machine).
`--quick` runs a tiny version (minutes) to check the plumbing. `--report-only DIR` computes
nothing and writes the report of OUT's finished stages (for the targets, pools, methods and seeds
given) to DIR: the finished part of a stopped run, or a subset of a finished one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SYSTEM = "Answer the question. End with the final answer."
DEFAULT_TARGETS = "gsm8k,bbh:sports_understanding,bbh:hyperbaton,bbh:snarks"
N_DEV = {"gsm8k": 8, "bbh": 3}  # validation examples per target (few-shot prompt sizes)
MAX_NEW = {"gsm8k": 200, "bbh": 8}  # generation length for exact match


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


def _fits(tokenizer, max_length: int | None):
    """A predicate: does the row's whole chat-formatted record fit in max_length tokens? (A cut
    answer would train and score on part of the answer.)"""
    if tokenizer is None:
        return lambda row: True
    from g2is_jax.data.formats import convert_record
    from g2is_jax.data.tokenize import encode_record

    def fits(row: dict) -> bool:
        rec = convert_record(_record(row), index=0, source=row["id"])
        return len(encode_record(rec, tokenizer, max_length=1 << 20).input_ids) <= max_length

    return fits


def _take(rows: list[dict], rng, k: int, fits) -> list[dict]:
    """Up to k rows that fit, in a seeded random order (only as many tokenized as needed)."""
    out = []
    for i in rng.permutation(len(rows)):
        if len(out) == k:
            break
        if fits(rows[i]):
            out.append(rows[i])
    return out


def _write(rows: list[dict], path: Path) -> Path:
    text = "".join(json.dumps(_record(r), ensure_ascii=False) + "\n" for r in rows)
    if not path.exists() or path.read_text(encoding="utf-8") != text:  # keep the hash stable
        path.write_text(text, encoding="utf-8")
    return path


def build_files(data: Path, out: Path, *, targets: list[str], pool_size: int, n_train: int,
                n_test: int, n_test_gsm8k: int, seed: int, tokenizer=None,
                max_length: int | None = None) -> dict:
    """Write OUT/pool.jsonl and per target OUT/<name>.{dev,test,train}.jsonl; return the
    [[targets]] tables and the pool path. Only rows that fit `max_length` tokens are used."""
    rng = np.random.default_rng(seed)
    fits = _fits(tokenizer, max_length)
    tasks = sorted(p.stem for p in (data / "bbh").glob("*.json"))
    out.mkdir(parents=True, exist_ok=True)
    target_tasks = set()
    tables = []
    for spec in targets:
        if spec == "gsm8k":
            name, kind, domain = "gsm8k", "gsm8k", "gsm8k"
            k = N_DEV[kind]
            picked = _take(_gsm8k(data / "gsm8k", "train"), rng, k + n_train, fits)
            dev, own = picked[:k], picked[k:]
            test = sorted(_take(_gsm8k(data / "gsm8k", "test"), rng, n_test_gsm8k, fits),
                          key=lambda r: r["id"])
        elif spec.startswith("bbh:") and spec[4:] in tasks:
            name, kind, task = spec[4:], "bbh", spec[4:]
            domain = f"bbh/{task}"
            target_tasks.add(task)
            k = N_DEV[kind]
            picked = _take(_bbh(data / "bbh", task), rng, k + n_train + n_test, fits)
            if len(picked) < k + n_train + 10:
                raise SystemExit(f"bbh/{task} has {len(picked)} usable examples: lower --n-train")
            dev, own = picked[:k], picked[k:k + n_train]
            test = sorted(picked[k + n_train:], key=lambda r: r["id"])
        else:
            raise SystemExit(f"unknown target {spec!r}: use gsm8k or bbh:<task> "
                             f"({', '.join(tasks)})")
        paths = {part: _write(rows, out / f"{name}.{part}.jsonl")
                 for part, rows in (("dev", dev), ("test", test), ("train", own))}
        tables.append({"name": name, "dev": str(paths["dev"]), "test": str(paths["test"]),
                       "train": str(paths["train"]), "domain": domain,
                       "max_new_tokens": MAX_NEW[kind]})
    general = [t for t in tasks if t not in target_tasks]
    # Even shares; a task with too few fitting rows gives its shortfall to the others.
    rows = {t: _bbh(data / "bbh", t) for t in general}
    order = {t: [int(i) for i in rng.permutation(len(rows[t]))] for t in general}
    taken: dict[str, list[dict]] = {t: [] for t in general}
    open_tasks = list(general)
    while open_tasks and sum(len(v) for v in taken.values()) < pool_size:
        need = pool_size - sum(len(v) for v in taken.values())
        share = max(1, need // len(open_tasks))
        for t in list(open_tasks):
            got = 0
            while got < share and order[t]:
                row = rows[t][order[t].pop(0)]
                if fits(row):
                    taken[t].append(row)
                    got += 1
            if not order[t]:
                open_tasks.remove(t)
            if sum(len(v) for v in taken.values()) >= pool_size:
                break
    pool = [r for t in general for r in taken[t]]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    return {"pool": str(_write(pool, out / "pool.jsonl")), "targets": tables,
            "general_tasks": {t: len(taken[t]) for t in general}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder with gsm8k/ and bbh/ (default ../shared/data)")
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated: gsm8k, "
                    f"bbh:<task> (default {DEFAULT_TARGETS})")
    ap.add_argument("--out", type=Path, default=Path("runs/eval"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool-size", type=int, default=2000, help="general pool records")
    ap.add_argument("--n-train", type=int, default=100, help="each target's own training split")
    ap.add_argument("--n-test", type=int, default=60, help="test records per BBH target")
    ap.add_argument("--n-test-gsm8k", type=int, default=30, help="GSM8K test records")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--methods", default="g2is,g2is-robust,g2is-abs,less,random")
    ap.add_argument("--ratio", default="0.01")
    ap.add_argument("--seeds", default="0,1,2", help="fine-tune seeds")
    ap.add_argument("--pools", default="general,with-target")
    ap.add_argument("--projection", default="rademacher")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0, help="seed of the data split and pool")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny version to check the plumbing (not a result)")
    ap.add_argument("--report-only", type=Path, metavar="DIR",
                    help="compute nothing: write the report of the finished stages of OUT for "
                    "these targets, pools, methods and seeds to DIR (a stopped run's finished "
                    "part, or a subset); a stage that is not finished is an error")
    ap.add_argument("--report-targets", metavar="NAMES",
                    help="with --report-only: only these targets (comma-separated names, e.g. "
                    "gsm8k,snarks); the data files are still built from --targets")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="any `g2is run` config override (repeat)")
    args = ap.parse_args(argv)
    if not (args.data / "gsm8k" / "train.jsonl").is_file() or not (args.data / "bbh").is_dir():
        print(f"skipped: no GSM8K/BBH files under {args.data} (pass --data)")
        return 0
    if args.quick:
        args.pool_size, args.n_train, args.n_test, args.n_test_gsm8k = 120, 10, 8, 4
        args.dim, args.seeds = 512, "0"

    from g2is_jax.cli import setup_logging
    from g2is_jax.models.loading import load_tokenizer
    from g2is_jax.pipeline import run_pipeline
    from g2is_jax.report import format_report
    from g2is_jax.runconfig import config_from_mapping

    setup_logging()  # INFO lines, no orbax noise, as the CLI
    files = build_files(args.data, args.out / "data", targets=args.targets.split(","),
                        pool_size=args.pool_size, n_train=args.n_train, n_test=args.n_test,
                        n_test_gsm8k=args.n_test_gsm8k, seed=args.seed,
                        tokenizer=load_tokenizer(args.model), max_length=args.max_length)
    doc = {
        "model": args.model,
        "max_length": args.max_length,
        "data": {"pool": files["pool"]},
        "targets": files["targets"],
        # >= 50 optimizer steps of a small effective batch: LESS's 5% of the pool (100 records
        # at the default size), batch 2, no accumulation, 2 epochs = 100 steps.
        "warmup": {"preset": "cpu", "fraction": 0.05, "epochs": 1 if args.quick else 2,
                   "batch_size": 2, "grad_accum": 1, "lora_rank": 8},
        "features": {"projection": args.projection, "dim": args.dim, "batch_size": 8,
                     "checkpoints": "last"},
        "select": {"methods": args.methods.split(","), "ratios": [float(r) for r in
                                                                  args.ratio.split(",")],
                   "seeds": [int(s) for s in args.seeds.split(",")],
                   "pools": args.pools.split(",")},
        "finetune": {"preset": "cpu-finetune", "batch_size": 4, "lora_rank": 8},
        "evaluate": {"generate": True, "max_new_tokens": 8, "batch_size": 10},
    }
    from g2is_jax.runconfig import apply_overrides

    cfg = config_from_mapping(apply_overrides(doc, args.overrides))
    if args.report_only:
        from g2is_jax.pipeline import report_finished

        if args.report_targets:
            import dataclasses

            keep = set(args.report_targets.split(","))
            unknown = keep - {t.name for t in cfg.targets}
            if unknown:
                raise SystemExit(f"--report-targets: no target {sorted(unknown)} in this run")
            cfg = dataclasses.replace(cfg, targets=tuple(t for t in cfg.targets
                                                         if t.name in keep))
        report = report_finished(cfg, args.out, args.report_only)
        print(format_report(report))
        return 0
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "experiment.json").write_text(json.dumps(
        {"argv": sys.argv[1:] if argv is None else list(argv), "general_tasks":
         files["general_tasks"], "config": cfg.to_json()}, indent=1) + "\n")
    report = run_pipeline(cfg, args.out)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
