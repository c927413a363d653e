"""`g2is demo`: the pipeline on the embedded default (SmolLM2-135M + the synthetic suite)."""

from __future__ import annotations

import argparse
import dataclasses


def register(sub: argparse._SubParsersAction) -> None:
    from g2is_jax.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="run the pipeline on SmolLM2-135M and the synthetic suite (~15 min on 2 CPUs)",
        description="Writes the synthetic suite, trains a warmup LoRA, computes Adam gradient "
        "features of the pool and SGD features of the target's validation split, selects with "
        "g2is, less and random, and prints how much of each selection is clean target data "
        "and how many conflicting records it took. Every step is cached in --out; re-run to "
        "resume.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--target", default=d.target, help="target domain of the suite")
    p.add_argument("--n-pool", type=int, default=d.n_pool)
    p.add_argument("--ratio", type=float, default=d.ratio)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from g2is_jax.demo import DemoConfig, format_report, run_demo

    cfg = dataclasses.replace(DemoConfig(), model=args.model, target=args.target,
                              n_pool=args.n_pool, ratio=args.ratio, dim=args.dim, seed=args.seed)
    report = run_demo(args.out, cfg)
    print(format_report(report))
    print(f"report: {args.out}/report.md and {args.out}/report.json")
    return 0
