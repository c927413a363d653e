"""`g2is demo`: the pipeline on the embedded default (SmolLM2-135M + the synthetic suite)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on SmolLM2-135M and the synthetic suite (~15 min, 2 CPUs)",
        description="`g2is run` with the demo's config (g2is_jax/demo.py says why these sizes): "
        "writes the synthetic suite, trains a warmup LoRA, computes Adam gradient features of "
        "the pool and SGD features of the target's validation split, selects with g2is, less "
        "and random, fine-tunes a LoRA on each selection, evaluates on the target's test split "
        "and writes OUT/report.md with plots. Every step is cached in --out; re-run to resume.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target", default="arithmetic", help="target domain of the suite")
    p.add_argument("--n-pool", type=int, default=500, help="pool size (default 500)")
    p.add_argument("--ratio", type=float, default=0.05, help="selection budget (default 0.05)")
    p.add_argument("--dim", type=int, default=8192, help="projection dim (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from g2is_jax.demo import demo_config, run_demo
    from g2is_jax.io import check_output_dir
    from g2is_jax.report import format_report

    check_output_dir(args.out, "--out")
    cfg = demo_config(model=args.model, target=args.target, n_pool=args.n_pool,
                      ratio=args.ratio, dim=args.dim, seed=args.seed)
    report = run_demo(args.out, cfg, progress=not args.no_progress)
    print(format_report(report))
    print(f"report: {args.out}/report.md (plots in {args.out}/plots/), data: {args.out}/"
          "report.json")
    return 0
