"""`g2is select`: choose a subset of the pool from its features with any registered method.

Reads features (a `.npy` file or a feature-store directory, one per checkpoint), runs the method
from the registry (`g2is_jax.select.methods`), writes OUT/selection.json and, with --data,
OUT/selected.jsonl. Flags map one to one onto `SelectOptions` fields.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from g2is_jax.cli import _scale
from g2is_jax.errors import G2ISError

log = logging.getLogger(__name__)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _neighbors(text: str) -> int:
    return 0 if text.strip().lower() == "all" else _int(text)


def register(subparsers: Any) -> None:
    from g2is_jax.vocab import (
        METHOD_HELP,
        METHOD_NAMES,
        PCA_SIGNS,
        POOL_MEAN,
        STORAGE_DTYPES,
        VAL_NORMALIZE,
        WALK_MODES,
    )

    p = subparsers.add_parser(
        "select",
        help="select a subset of the pool from gradient features "
             f"({', '.join(METHOD_NAMES)})",
        description=(
            "Select rows of the pool from its features. T and V are each a .npy file (rows × "
            "dim) or a feature-store directory (features.npy + meta.json). Give --train-features "
            "and --val-features once per checkpoint, in the same order: LESS sums its scores "
            "over checkpoints weighted by each checkpoint's learning rate (meta.json "
            "checkpoint_lr); the walks (this project's extension: the authors consume one T and "
            "one V) use the checkpoints' normalised features concatenated with sqrt(lr weight) "
            "scaling, so dot products become lr-weighted cosine sums. Writes OUT/selection.json "
            "({indices, per_component, conventions, diagnostics, config, ...}) and, with --data, "
            "OUT/selected.jsonl: the selected lines, unchanged, in selection order. The walk "
            "splits T's rows over every device of the --mesh (and of every process); the "
            "selection is the same as on one device."
        ),
    )
    p.add_argument("--train-features", metavar="T", action="append", required=True,
                   help="pool features: .npy or feature-store dir (repeat per checkpoint)")
    p.add_argument("--val-features", metavar="V", action="append", required=True,
                   help="target validation features (repeat per checkpoint, same order as T)")
    p.add_argument("--val-subtasks", metavar="FILE",
                   help="subtask of each validation row, for less/rds (mean within a subtask, "
                        "max over subtasks): a .json list of names, one per validation row, or "
                        "a text file with one name per line; default: one subtask")
    p.add_argument("--method", choices=METHOD_NAMES, default="g2is",
                   help="; ".join(f"{m}: {h}" for m, h in METHOD_HELP.items())
                   + " (default g2is)")
    p.add_argument("--ratio", type=_float, default=0.01,
                   help="fraction of the pool to select, in (0, 1]; int(N*ratio) rows "
                        "(default 0.01, the authors')")
    p.add_argument("--delta", type=_float, default=0.8,
                   help="walk consistency threshold in (0, 1] (default 0.8)")
    p.add_argument("--pca-variance", type=_float, default=0.5,
                   help="walks: keep the fewest principal components of V whose explained "
                        "variance exceeds this fraction, in (0, 1) (default 0.5)")
    p.add_argument("--n-components", type=_int, default=None,
                   help="walks: keep exactly this many components instead of --pca-variance "
                        "(an absolute count; the authors' count-ratio mode keeps "
                        "max(1, int(dim × val_k)) components: pass that number here)")
    p.add_argument("--pca-sign", choices=PCA_SIGNS, default="v-based",
                   help="sign convention of each principal component: v-based (scikit-learn "
                        ">= 1.5: largest-magnitude coordinate positive; default) or u-based "
                        "(scikit-learn < 1.5: the validation row with the largest |score| "
                        "scores positive). g2is depends on it; g2is-robust and g2is-abs do not")
    p.add_argument("--val-normalize", choices=VAL_NORMALIZE, default="unit",
                   help="V's rows before the PCA: unit (default, as LESS stores validation "
                        "features) or raw; the same rule for one checkpoint and several")
    p.add_argument("--pool-mean", choices=POOL_MEAN, default="keep",
                   help="walks: the pool's features as computed (keep, default; the authors') "
                        "or with the mean direction of their unit rows projected out of every "
                        "row (remove; this project's option: LESS's Adam features share the "
                        "optimizer's first moment, which can keep the no-conflict rule from "
                        "ever firing; the diagnostics show when)")
    p.add_argument("--neighbors", type=_neighbors, default=100,
                   help="walks: length of each row's neighbour list; 100 is this project's "
                        "default (the authors' graph width is unspecified); 0 or 'all' = the "
                        "full sorted list (parity with a full graph)")
    p.add_argument("--anchor-pool", type=_int, default=1000,
                   help="walks: anchor candidates scanned first, as in the authors' release "
                        "(default 1000; the chosen anchor does not depend on it)")
    p.add_argument("--mode", choices=WALK_MODES, default="onthefly",
                   help="walk neighbours: computed on the fly (default, no graph) or from a "
                        "kNN graph (--graph FILE from `g2is graph`, else built in memory)")
    p.add_argument("--graph", metavar="FILE", help="kNN graph from `g2is graph` (--mode graph)")
    p.add_argument("--dtype", choices=STORAGE_DTYPES, default="auto",
                   help="walk storage dtype on the device: auto keeps the file's (float64 "
                        "needs JAX_ENABLE_X64=1); bfloat16 halves memory for big pools")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip the diagnostics (pool conflict statistics and the walk's "
                        "per-component rejection counts; one more pass per selected row)")
    p.add_argument("--seed", type=_int, default=0, help="seed for --method random (default 0)")
    p.add_argument("--data", metavar="POOL.jsonl",
                   help="the pool's JSONL file, one record per feature row: writes "
                        "OUT/selected.jsonl with the selected lines unchanged")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    _scale.add_arguments(p, fsdp=False)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from g2is_jax.select.methods import SelectOptions

    return SelectOptions(
        ratio=args.ratio, delta=args.delta, pca_variance=args.pca_variance,
        n_components=args.n_components, pca_sign=args.pca_sign,
        val_normalize=args.val_normalize, pool_mean=args.pool_mean, neighbors=args.neighbors,
        anchor_pool=args.anchor_pool,
        mode=args.mode, dtype=args.dtype, seed=args.seed, diagnostics=not args.no_diagnostics)


def run(args: argparse.Namespace) -> int:
    import jax

    from g2is_jax import __version__
    from g2is_jax.data import read_raw_records
    from g2is_jax.io import check_output_dir, write_file_set
    from g2is_jax.select import features as feats
    from g2is_jax.select.methods import SelectionInputs, method_config, run_method

    options = options_from_args(args)

    check_output_dir(args.out, "--out")  # before any work
    mesh = _scale.setup(args)
    train = feats.load_checkpoints(args.train_features, role="train")
    val = feats.load_checkpoints(args.val_features, role="validation")
    feats.check_pairing(train, val)
    lines = None
    if args.data:  # checked before any compute: a wrong file should fail fast
        lines = read_raw_records(args.data)  # the records grads read, one line each
        feats.check_data_matches(lines, train[0], args.data)
    weights = feats.checkpoint_weights(train)
    subtasks = None
    if args.val_subtasks:
        if args.method not in ("less", "rds"):
            log.warning("--val-subtasks only affects less and rds; ignored for %s", args.method)
        else:
            subtasks = feats.load_subtasks(args.val_subtasks, val[0].n)
    graph = None
    if args.graph:
        if args.mode != "graph":
            raise G2ISError("--graph is used by --mode graph; add --mode graph or drop --graph")
        from g2is_jax.select.graph import KnnGraph, fingerprint
        from g2is_jax.select.methods import walk_inputs

        graph = KnnGraph.load(args.graph)
        want = graph.meta.get("fingerprint")
        t_walk = walk_inputs(SelectionInputs([s.array for s in train],
                                             [s.array for s in val], weights),
                             pool_mean=args.pool_mean)[0]
        if want is not None and want != fingerprint(t_walk):
            raise G2ISError(
                f"{args.graph} was built from other features; rebuild it with `g2is graph` "
                f"from the same --train-features and --pool-mean {args.pool_mean}"
            )
    inputs = SelectionInputs([s.array for s in train], [s.array for s in val], weights,
                             subtasks, graph, mesh)
    result = run_method(args.method, inputs, options)
    if jax.process_index() != 0:  # every process ran the same selection; one writes it
        return 0

    out = Path(args.out)
    doc = result.to_json()
    ids = train[0].record_ids
    if ids is not None:
        doc["record_ids"] = [ids[i] for i in result.indices]
    doc["config"] = {
        **method_config(args.method, options),
        "graph": args.graph,
        "train_features": list(args.train_features),
        "val_features": list(args.val_features),
        "val_subtasks": args.val_subtasks,
        "checkpoint_weights": [float(w) for w in weights],
        "n_pool": train[0].n,
        "n_val": val[0].n,
        "data": args.data,
        "version": __version__,
    }
    # One set: selection.json is committed last, and a stale selected.jsonl is removed.
    write_file_set(out, {"selected.jsonl": None if lines is None else
                         b"".join(lines[int(i)] for i in result.indices),
                         "selection.json": json.dumps(doc, indent=1) + "\n"},
                   commit="selection.json")
    print(
        f"{args.method}: selected {len(result.indices)} of {train[0].n} rows "
        f"(budget {result.budget}) -> {out / 'selection.json'}"
    )
    for c in result.per_component:
        pole = {1: " (+ pole)", -1: " (- pole)"}.get(c.pole, "")
        counts = ""
        if c.candidates:
            counts = (f"; rejected per step: {c.conflict_rejected / c.candidates:.1%} by "
                      f"conflict, {c.consistency_rejected / c.candidates:.1%} by consistency")
        print(f"  component {c.component}{pole}: weight {c.weight:.3f}, "
              f"{c.selected}/{c.budget} rows, {c.fallback_steps} fallbacks{counts}")
    diag = result.diagnostics or {}
    if "pool" in diag:
        pool = diag["pool"]
        print(f"  pool: {pool['negative_pair_fraction']:.2%} of {pool['pairs_sampled']:,} "
              f"sampled pairs conflict; {pool['mean_direction_energy']:.0%} of the feature "
              "energy on the mean direction")
    for line in diag.get("verdict", []):
        print(f"  warning: {line}")
    return 0
