"""How much does the arbitrary sign of each principal component move a G2IS selection?

Run on a finished `g2is run` directory (features computed), e.g. the experiment's:

    python scripts/sign_sensitivity.py --run runs/eval [--max-patterns 64]

For every target and pool setting of the run (or its one target), from the run's own features:
the authors' walk (`g2is`) under both scikit-learn sign rules and under every pattern of
component signs (up to `--max-patterns`, the rest sampled with a seed), and the sign-free
walks (`g2is-robust`, `g2is-abs`). Prints per scope how many of the selected rows come from the
target's own source (the "with-target" pool has some; the general pool has none, so there it
prints the overlap between selections instead), the range over sign patterns, and whether the
sign-free methods gave one selection for every pattern.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--max-patterns", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pools", help="pool settings to analyse (default: the run's)")
    ap.add_argument("--out", type=Path, help="write the table as JSON here too")
    args = ap.parse_args(argv)

    from g2is_jax.pipeline import _Pipeline
    from g2is_jax.runconfig import config_from_mapping
    from g2is_jax.select import core, walk_directions
    from g2is_jax.select.core import CoreKnowledge
    from g2is_jax.select.methods import walk_inputs
    from g2is_jax.select.plan import g2is_select
    from g2is_jax.select.walk import gradient_walk

    doc = json.loads((args.run / "run_config.json").read_text())
    if args.pools:
        doc["select"]["pools"] = args.pools.split(",")
    cfg = config_from_mapping(doc)
    # Read only: a stage that is not finished with these inputs is an error, nothing is touched.
    pipe = _Pipeline(cfg, args.run, progress=False, echo=False, read_only=True)
    pipe.load_data()
    pipe.warmup()
    pipe.compute_features()
    sc = cfg.select
    ratio = sc.ratios[0]
    rng = np.random.default_rng(args.seed)
    rows = []
    print("| target | pool | components | g2is v-based | g2is u-based | g2is over sign patterns "
          "(min–max) | patterns | g2is-robust | g2is-abs |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for scope in pipe.scopes():
        t, v, _ = walk_inputs(pipe.selection_inputs(scope), sc.val_normalize, sc.pool_mean)
        t = np.asarray(t, np.float32)
        pool = pipe.pool_records(scope)
        domain = scope.domain
        own = np.array([r.meta.get("domain") == domain for r in pool])
        common = dict(ratio=ratio, delta=sc.delta, pca_variance=sc.pca_variance,
                      n_components=sc.n_components, neighbors=sc.neighbors,
                      val_normalize=sc.val_normalize)

        def score(idx):
            return int(own[np.asarray(idx, np.int64)].sum())

        vb = g2is_select(t, v, pca_sign="v-based", **common)
        ub = g2is_select(t, v, pca_sign="u-based", **common)
        robust = {g2is_select(t, v, pca_sign=r, sign_handling="both-poles", **common)
                  .indices.tobytes() for r in ("v-based", "u-based")}
        absolute = {g2is_select(t, v, pca_sign=r, sign_handling="absolute", **common)
                    .indices.tobytes() for r in ("v-based", "u-based")}
        know = core.core_knowledge(v, pca_variance=sc.pca_variance, n_components=sc.n_components,
                                   val_normalize=sc.val_normalize)
        n_comp = len(know.weights)
        patterns = list(itertools.product((1.0, -1.0), repeat=n_comp))
        if len(patterns) > args.max_patterns:
            pick = rng.choice(len(patterns), args.max_patterns, replace=False)
            patterns = [patterns[i] for i in sorted(pick)]
        unit, sq = core.prepare_rows(t)
        total = core.total_budget(len(t), ratio)
        per_pattern, sets = [], []
        for signs in patterns:
            s = np.asarray(signs)
            flipped = CoreKnowledge(know.components * s[:, None], know.explained_variance_ratio,
                                    know.weights, know.scores * s[None, :])
            dirs, weights, _, _, rank_abs = walk_directions(flipped, "signed")
            out = gradient_walk(unit, sq, dirs, core.allocate_budgets(total, weights),
                                n_rows=len(t), delta=sc.delta, neighbors=sc.neighbors,
                                rank_abs=rank_abs)
            per_pattern.append(score(out.indices))
            sets.append(frozenset(out.indices.tolist()))
        overlap = len(set(vb.indices.tolist()) & set(ub.indices.tolist()))
        row = {"target": scope.target or "-", "pool": scope.pool, "components": n_comp,
               "v_based_own": score(vb.indices), "u_based_own": score(ub.indices),
               "v_u_overlap": overlap, "budget": total,
               "patterns": len(patterns), "pattern_own_min": min(per_pattern),
               "pattern_own_max": max(per_pattern), "distinct_sets": len(set(sets)),
               "robust_one_selection": len(robust) == 1, "abs_one_selection": len(absolute) == 1}
        rows.append(row)
        print(f"| {row['target']} | {scope.pool} | {n_comp} | {row['v_based_own']} | "
              f"{row['u_based_own']} (overlap {overlap}/{total}) | "
              f"{row['pattern_own_min']}–{row['pattern_own_max']} ({row['distinct_sets']} "
              f"distinct sets) | {len(patterns)} | "
              f"{'same' if row['robust_one_selection'] else 'DIFFERS'} | "
              f"{'same' if row['abs_one_selection'] else 'DIFFERS'} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
