"""`g2is select`: choose a subset of the pool from its features (G2IS, LESS, random, RDS).

Reads features (a `.npy` file or a feature-store directory, one per checkpoint), runs the chosen
method from `g2is_jax.select`, writes OUT/selection.json and, with --data, OUT/selected.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from g2is_jax.cli import _scale
from g2is_jax.errors import G2ISError

log = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float64")


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


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "select",
        help="select a subset of the pool from gradient features (g2is, less, random, rds)",
        description=(
            "Select rows of the pool from its features. T and V are each a .npy file (rows × "
            "dim) or a feature-store directory (features.npy + meta.json). Give --train-features "
            "and --val-features once per checkpoint, in the same order: LESS sums its scores "
            "over checkpoints weighted by each checkpoint's learning rate (meta.json "
            "checkpoint_lr); G2IS walks on the checkpoints' normalised features concatenated "
            "with sqrt(lr weight) scaling, so dot products become lr-weighted cosine sums. "
            "Writes OUT/selection.json ({indices, per_component, config, ...}) and, with "
            "--data, OUT/selected.jsonl: the selected lines, unchanged, in selection order. "
            "The g2is walk splits T's rows over every device of the --mesh (and of every "
            "process); the selection is the same as on one device."
        ),
    )
    p.add_argument(
        "--train-features",
        metavar="T",
        action="append",
        required=True,
        help="pool features: .npy or feature-store dir (repeat per checkpoint)",
    )
    p.add_argument(
        "--val-features",
        metavar="V",
        action="append",
        required=True,
        help="target validation features (repeat per checkpoint, same order as T)",
    )
    p.add_argument(
        "--val-subtasks",
        metavar="FILE",
        help="subtask of each validation row, for less/rds (mean within a subtask, "
        "max over subtasks): a .json list of names, one per validation row, or a "
        "text file with one name per line; default: one subtask",
    )
    p.add_argument(
        "--method",
        choices=("g2is", "less", "random", "rds"),
        default="g2is",
        help="g2is: gradient walk (default); less: top cosine scores; random; "
        "rds: LESS scoring on representation features given as T and V",
    )
    p.add_argument(
        "--ratio",
        type=_float,
        default=0.01,
        help="fraction of the pool to select, in (0, 1]; int(N*ratio) rows (default 0.01)",
    )
    p.add_argument(
        "--delta",
        type=_float,
        default=0.8,
        help="g2is consistency threshold in (0, 1] (default 0.8)",
    )
    p.add_argument(
        "--pca-variance",
        type=_float,
        default=0.5,
        help="g2is: keep the fewest principal components of V whose explained "
        "variance exceeds this fraction, in (0, 1) (default 0.5)",
    )
    p.add_argument(
        "--n-components",
        type=_int,
        default=None,
        help="g2is: keep exactly this many components instead of --pca-variance",
    )
    p.add_argument(
        "--neighbors",
        type=_int,
        default=100,
        help="g2is: length of each row's neighbour list (default 100)",
    )
    p.add_argument(
        "--anchor-pool",
        type=_int,
        default=1000,
        help="g2is: anchor candidates scanned first, as in the authors' release "
        "(default 1000; the chosen anchor does not depend on it)",
    )
    p.add_argument(
        "--mode",
        choices=("onthefly", "graph"),
        default="onthefly",
        help="g2is neighbours: computed on the fly (default, no graph) or from a "
        "kNN graph (--graph FILE from `g2is graph`, else built in memory)",
    )
    p.add_argument("--graph", metavar="FILE", help="kNN graph from `g2is graph` (--mode graph)")
    p.add_argument(
        "--dtype",
        choices=_DTYPES,
        default="auto",
        help="g2is storage dtype on the device: auto keeps the file's (float64 needs "
        "JAX_ENABLE_X64=1); bfloat16 halves memory for big pools",
    )
    p.add_argument("--seed", type=_int, default=0, help="seed for --method random (default 0)")
    p.add_argument(
        "--data",
        metavar="POOL.jsonl",
        help="the pool's JSONL file, one record per feature row: writes "
        "OUT/selected.jsonl with the selected lines unchanged",
    )
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    _scale.add_arguments(p, fsdp=False)
    p.set_defaults(func=run)


def _storage(array: Any, dtype: str) -> Any:
    import jax

    if dtype == "auto":
        return array
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise G2ISError("--dtype float64 needs JAX's x64 mode: set JAX_ENABLE_X64=1")
    if dtype == "bfloat16":
        import jax.numpy as jnp

        return jnp.asarray(np.asarray(array, np.float32), jnp.bfloat16)
    return np.asarray(array, dtype)


def _select(args: argparse.Namespace, train: list, val: list, weights: np.ndarray, mesh: Any):
    from g2is_jax import select as sel
    from g2is_jax.select import features as feats

    n_rows = train[0].n
    subtasks = None
    if args.val_subtasks:
        if args.method not in ("less", "rds"):
            log.warning("--val-subtasks only affects less and rds; ignored for %s", args.method)
        else:
            subtasks = feats.load_subtasks(args.val_subtasks, val[0].n)
    if args.method == "random":
        return sel.random_select(n_rows, ratio=args.ratio, seed=args.seed)
    if args.method == "less":
        return sel.less_select(
            [t.array for t in train],
            [v.array for v in val],
            ratio=args.ratio,
            weights=weights,
            subtasks=subtasks,
        )
    if args.method == "rds":
        if len(train) != 1:
            raise G2ISError("rds takes one representation file each for T and V, not several")
        return sel.representation_select(
            train[0].array, val[0].array, ratio=args.ratio, subtasks=subtasks
        )
    t = feats.combine_checkpoints([s.array for s in train], weights)
    v = feats.combine_checkpoints([s.array for s in val], weights)
    graph = None
    if args.graph:
        if args.mode != "graph":
            raise G2ISError("--graph is used by --mode graph; add --mode graph or drop --graph")
        from g2is_jax.select.graph import KnnGraph, fingerprint

        graph = KnnGraph.load(args.graph)
        want = graph.meta.get("fingerprint")
        if want is not None and want != fingerprint(t):
            raise G2ISError(
                f"{args.graph} was built from other features; rebuild it with `g2is graph` "
                "from the same --train-features"
            )
    return sel.g2is_select(
        _storage(t, args.dtype),
        v,
        ratio=args.ratio,
        delta=args.delta,
        pca_variance=args.pca_variance,
        n_components=args.n_components,
        neighbors=args.neighbors,
        anchor_pool=args.anchor_pool,
        mode=args.mode,
        graph=graph,
        mesh=mesh,
    )


def run(args: argparse.Namespace) -> int:
    import jax

    from g2is_jax import __version__
    from g2is_jax.data import read_raw_records
    from g2is_jax.io import check_output_dir, write_file_set
    from g2is_jax.select import features as feats

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
    result = _select(args, train, val, weights, mesh)
    if jax.process_index() != 0:  # every process ran the same selection; one writes it
        return 0

    out = Path(args.out)
    doc = result.to_json()
    ids = train[0].record_ids
    if ids is not None:
        doc["record_ids"] = [ids[i] for i in result.indices]
    doc["config"] = {
        "method": args.method,
        "ratio": args.ratio,
        "delta": args.delta,
        "pca_variance": args.pca_variance,
        "n_components": args.n_components,
        "neighbors": args.neighbors,
        "anchor_pool": args.anchor_pool,
        "mode": args.mode,
        "graph": args.graph,
        "dtype": args.dtype,
        "seed": args.seed,
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
        print(
            f"  component {c['component']}: weight {c['weight']:.3f}, "
            f"{c['selected']}/{c['budget']} rows, {c['fallback_steps']} fallbacks"
        )
    return 0
