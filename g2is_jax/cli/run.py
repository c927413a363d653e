"""`g2is run`: the whole pipeline from a TOML/YAML config, cached and resumable in --out."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from g2is_jax.vocab import PCA_SIGNS, POOL_MEAN, VAL_NORMALIZE

    p = sub.add_parser(
        "run",
        help="the whole pipeline from a config: warmup, features, selection by several "
        "methods, fine-tune, evaluation and a report",
        description="Runs warmup LoRA training, Adam gradient features of the pool and SGD "
        "features of the target's validation examples at each used checkpoint, selection by "
        "every method at every ratio (and seed), a LoRA fine-tune on each selection, and "
        "evaluation on the target's test examples (several targets with [[targets]], each in "
        "the pool settings select.pools); writes OUT/report.md, OUT/report.json and "
        "OUT/plots/. Every stage is cached in OUT and skipped when its inputs are unchanged; "
        "after a crash the same command continues where it stopped. Config keys: see "
        "g2is_jax/runconfig.py (and examples/ in the README).",
    )
    p.add_argument("--config", metavar="FILE", help="a .toml, .yaml or .yml run config")
    p.add_argument("--out", metavar="DIR", required=True, help="the run directory")
    p.add_argument("--model", help="override: model name, HF directory or GGUF file")
    p.add_argument("--methods", help="override select.methods, e.g. g2is,less,random,full")
    p.add_argument("--ratios", help="override select.ratios, e.g. 0.01,0.05")
    p.add_argument("--seeds", help="override select.seeds, e.g. 0,1,2")
    p.add_argument("--pca-sign", choices=PCA_SIGNS,
                   help="override select.pca_sign (the PCA sign convention g2is depends on)")
    p.add_argument("--val-normalize", choices=VAL_NORMALIZE,
                   help="override select.val_normalize (V's rows before the PCA)")
    p.add_argument("--pool-mean", choices=POOL_MEAN,
                   help="override select.pool_mean (walks: remove = the pool's mean feature "
                        "direction projected out before the walk)")
    p.add_argument("--pools", help="override select.pools, e.g. general,with-target")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append",
                   default=[], help="override any config key, e.g. warmup.epochs=2 (repeat)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = []
    if args.model:
        out.append(f"model={args.model}")
    for key in ("methods", "ratios", "seeds", "pca_sign", "val_normalize", "pool_mean", "pools"):
        value = getattr(args, key)
        if value:
            out.append(f"select.{key}={value}")
    return out + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    from g2is_jax.io import check_output_dir
    from g2is_jax.pipeline import run_pipeline
    from g2is_jax.report import format_report
    from g2is_jax.runconfig import load_run_config

    cfg = load_run_config(args.config, overrides_from_args(args))
    check_output_dir(args.out, "--out")
    report = run_pipeline(cfg, args.out, progress=not args.no_progress)
    print(format_report(report))
    return 0
