"""`g2is suite`: write the embedded synthetic task suite (pool + per-domain dev/test) to disk."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from g2is_jax.data import DOMAINS

    p = sub.add_parser(
        "suite",
        help="write the synthetic task suite (a mixed pool and per-domain dev/test splits)",
        description="Writes OUT/pool.jsonl (a shuffled mix of every domain's clean and "
        "conflicting records plus distractors, each labelled with meta.domain and meta.kind), "
        "OUT/<domain>.dev.jsonl and OUT/<domain>.test.jsonl (clean, disjoint from the pool) and "
        f"OUT/suite.json. Domains: {', '.join(DOMAINS)}. Deterministic for a given --seed.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-pool", type=int, default=3000)
    p.add_argument("--n-dev", type=int, default=16)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", choices=list(DOMAINS), help="a domain whose share is fixed")
    p.add_argument("--target-share", type=float, help="that domain's share of the pool")
    p.add_argument("--conflict-share", type=float, default=0.2)
    p.add_argument("--distractor-share", type=float, default=0.3)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from g2is_jax.data import suite
    from g2is_jax.io import check_output_dir

    check_output_dir(args.out, "--out")
    files = suite(args.out, n_pool=args.n_pool, n_dev=args.n_dev, n_test=args.n_test,
                  seed=args.seed, target=args.target, target_share=args.target_share,
                  conflict_share=args.conflict_share, distractor_share=args.distractor_share)
    print(json.dumps({"pool": str(files.pool), "manifest": str(files.manifest)}))
    return 0
