"""How long must the warm-up be for gradient conflicts to appear? Pool diagnostics per checkpoint.

Run after a `g2is run` (or the experiment script) has trained its warm-up:

    python scripts/warmup_probe.py --run runs/eval [--sample 256] [--out runs/eval/probe.json]

For every warm-up epoch checkpoint in RUN/warmup/checkpoints, computes the Adam features of a
seeded sample of the pool (RUN's config: model, max length, projection) and prints the pool
diagnostics (`g2is_jax.select.pool_diagnostics`): the fraction of negative-cosine pairs among the
sample's pairs and the share of feature energy on the mean pool direction. The optimizer steps
of each checkpoint come from its metadata. G2IS's no-conflict rule needs the first to be well
above zero; after a very short warm-up it is ~0 (see the README).
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
    table = []
    print("| warm-up epoch | optimizer steps | pool pairs with cos < 0 | energy on the mean "
          "direction | median pair cosine |")
    print("|---:|---:|---:|---:|---:|")
    for ckpt in ckpts:
        tuned, moments, meta = load_checkpoint(model, ckpt)
        with tempfile.TemporaryDirectory() as d:
            path = compute_features(tuned, tok, sample, d, gradient="adam", projector=projector,
                                    moments=moments, batch_size=fc.batch_size,
                                    max_length=cfg.max_length, progress=False)
            feats = np.load(Path(path) / "features.npy") if Path(path).is_dir() else np.load(
                path)
        diag = pool_diagnostics(feats, sample=len(sample), seed=args.seed)
        steps = meta.get("step") or meta.get("updates") or meta.get("optimizer_steps")
        row = {"epoch": int(ckpt.name), "steps": steps, **diag}
        table.append(row)
        print(f"| {row['epoch']} | {steps if steps is not None else '–'} | "
              f"{diag['negative_pair_fraction']:.2%} | {diag['mean_direction_energy']:.0%} | "
              f"{diag['median_pair_cosine']:.3f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "sample": len(sample),
                                        "rows": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
