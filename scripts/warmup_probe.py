"""How long must the warm-up be for gradient conflicts to appear? Pool diagnostics per checkpoint.

Run after a `g2is run` (or the experiment script) has trained its warm-up:

    python scripts/warmup_probe.py --run runs/eval [--sample 256] [--out runs/eval/probe.json]

For every warm-up epoch checkpoint in RUN/warmup/checkpoints, computes the Adam features (and,
with `--gradients adam,sgd`, the plain gradients) of a seeded sample of the pool (RUN's config:
model, max length, projection) and prints the pool diagnostics
(`g2is_jax.select.pool_diagnostics`): the fraction of negative-cosine pairs among the sample's
pairs and the share of feature energy on the mean pool direction. The optimizer steps
of each checkpoint come from its metadata. G2IS's no-conflict rule needs the first to be well
above zero; after a very short warm-up it is ~0 (see the README). Comparing Adam with SGD
features of the same rows tells whether a shared direction comes from the gradients themselves
or from the optimizer's first moment, which LESS's Adam feature m' / sqrt(v') carries with
weight b1 = 0.9 in every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a g2is run directory")
    ap.add_argument("--sample", type=int, default=256, help="pool records to featurize")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradients", default="adam", help="comma list of adam, sgd")
    ap.add_argument("--last", action="store_true", help="only the last warm-up checkpoint")
    ap.add_argument("--out", type=Path, help="write the table as JSON here too")
    args = ap.parse_args(argv)

    from g2is_jax.data import load_records
    from g2is_jax.featurize import compute_features
    from g2is_jax.models.loading import load_model
    from g2is_jax.projection import Projector
    from g2is_jax.runconfig import config_from_mapping
    from g2is_jax.select import pool_diagnostics
    from g2is_jax.train import load_checkpoint

    cfg = config_from_mapping(json.loads((args.run / "run_config.json").read_text()))
    pool_path = (args.run / "data" / "pool.jsonl") if cfg.suite is not None else Path(
        cfg.data.pool)
    records = load_records(pool_path)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(len(records), size=min(args.sample, len(records)), replace=False))
    sample = [records[i] for i in rows]
    model, tok = load_model(cfg.model)
    fc = cfg.features
    projector = Projector(kind=fc.projection, dim=fc.dim, seed=fc.seed)
    ckpts = sorted((p for p in (args.run / "warmup" / "checkpoints").iterdir() if p.is_dir()),
                   key=lambda p: int(p.name))
    if args.last:
        ckpts = ckpts[-1:]
    table = []
    kinds = [k.strip() for k in args.gradients.split(",") if k.strip()]
    bad = sorted(set(kinds) - {"adam", "sgd"})
    if bad or not kinds:
        ap.error(f"--gradients takes adam and/or sgd, got {args.gradients!r}")
    print("| warm-up epoch | optimizer steps | features | pool pairs with cos < 0 | energy on the "
          "mean direction | median pair cosine |")
    print("|---:|---:|---|---:|---:|---:|")
    for ckpt in ckpts:
        tuned, moments, meta = load_checkpoint(model, ckpt)
        steps = meta.get("step") or meta.get("updates") or meta.get("optimizer_steps")
        for kind in kinds:
            with tempfile.TemporaryDirectory() as d:
                path = compute_features(tuned, tok, sample, d, gradient=kind, projector=projector,
                                        moments=moments if kind == "adam" else None,
                                        batch_size=fc.batch_size, max_length=cfg.max_length,
                                        progress=False)
                feats = np.load(Path(path) / "features.npy") if Path(path).is_dir() else \
                    np.load(path)
            diag = pool_diagnostics(feats, sample=len(sample), seed=args.seed)
            row = {"epoch": int(ckpt.name), "steps": steps, "gradient": kind, **diag}
            table.append(row)
            print(f"| {row['epoch']} | {steps if steps is not None else '–'} | {kind} | "
                  f"{diag['negative_pair_fraction']:.2%} | {diag['mean_direction_energy']:.0%} | "
                  f"{diag['median_pair_cosine']:.3f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "sample": len(sample),
                                        "rows": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
