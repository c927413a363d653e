"""`g2is graph`: the instruction graph (every row's top-k cosine neighbours) as a reusable file.

Built in blocks on the device (never N×N in memory) and saved as an .npz of arrays: `indices`
and `similarities` (rows × k, sorted by similarity, the row itself included) and a JSON `meta`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from g2is_jax.vocab import POOL_MEAN

    p = subparsers.add_parser(
        "graph",
        help="build the kNN instruction graph of the pool's features and save it (.npz)",
        description=(
            "Build every row's top-k cosine neighbours in blocks (never N×N in memory) and save "
            "them as OUT (.npz with arrays indices, similarities and a JSON meta). With several "
            "--train-features (one per checkpoint) the rows are combined as `g2is select` does. "
            "--mixed adds the validation rows as extra nodes N..N+n-1 (the paper's mixed graph, "
            "for inspection; `g2is select --mode graph` needs the pool-only graph)."
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
        help="validation features, needed by --mixed (repeat per checkpoint)",
    )
    p.add_argument(
        "--mixed", action="store_true", help="include the validation rows as nodes N..N+n-1"
    )
    p.add_argument(
        "--pool-mean",
        choices=POOL_MEAN,
        default="keep",
        help="the pool's features as computed (keep, default) or with their mean direction "
        "projected out (remove); use the value that `g2is select --pool-mean` will get",
    )
    p.add_argument(
        "--neighbors",
        type=int,
        default=100,
        help="neighbours kept per row (default 100; capped at the node count)",
    )
    p.add_argument(
        "--block-rows",
        type=int,
        default=512,
        help="query rows per device block (memory ~ block-rows × 4096 floats)",
    )
    p.add_argument("--out", metavar="FILE", required=True, help="output .npz file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from g2is_jax.errors import G2ISError
    from g2is_jax.io import check_output_file, os_error
    from g2is_jax.select import core
    from g2is_jax.select import features as feats
    from g2is_jax.select import graph as graph_lib

    out = check_output_file(args.out, "--out")  # before any work
    train = feats.load_checkpoints(args.train_features, role="train")
    weights = feats.checkpoint_weights(train)
    t = feats.combine_checkpoints([s.array for s in train], weights)
    if args.pool_mean == "remove":
        t, _ = feats.remove_mean_direction(t)
    core.check_positive_int("neighbors", args.neighbors)
    core.check_positive_int("block_rows", args.block_rows)
    unit, _ = core.prepare_rows(core.as_features(t, "train features"))
    if args.mixed:
        if not args.val_features:
            raise G2ISError("--mixed needs --val-features (one per checkpoint)")
        val = feats.load_checkpoints(args.val_features, role="validation")
        feats.check_pairing(train, val)
        v = feats.combine_checkpoints([s.array for s in val], weights)
        v_unit, _ = core.prepare_rows(core.as_features(v, "validation features"))
        g = graph_lib.mixed_graph(
            unit,
            v_unit[: val[0].n],
            args.neighbors,
            n_train=train[0].n,
            block_rows=args.block_rows,
        )
    else:
        g = graph_lib.knn_graph(unit, args.neighbors, n_rows=train[0].n, block_rows=args.block_rows)
    meta = dict(
        g.meta,
        fingerprint=graph_lib.fingerprint(t),
        train_features=list(args.train_features),
        val_features=list(args.val_features or []),
        checkpoint_weights=[float(w) for w in weights],
        pool_mean=args.pool_mean,
    )
    try:
        path = dataclasses.replace(g, meta=meta).save(out)
    except OSError as exc:  # e.g. a full disk: leave no temporary file behind
        out.with_name(out.name + ".tmp").unlink(missing_ok=True)
        raise os_error(out, exc) from None
    print(f"graph: {g.indices.shape[0]} nodes × {g.k} neighbours -> {path}")
    return 0
