"""bfloat16 against float32 on one model and one small sample, as `g2is run` computes features.

Run: ``python scripts/bf16_check.py [--model smollm2-135m] [--n-pool 256] [--n-loss 64]
[--n-dev 16] [--ratio 0.05] [--max-length 128] [--out DIR]``.

On the synthetic suite (`g2is_jax.data.suite`, target arithmetic, a short system message), it

1. warms up LoRA adapters in float32 on a quarter of the pool (preset cpu: r = 8, 1 epoch,
   batch 8, one update per batch), so the features are taken at a trained checkpoint with Adam
   moments, as the pipeline takes them;
2. computes, with that checkpoint, the pool's adam features and the dev set's sgd features
   twice: float32 model and float32 store, and bfloat16 model and bfloat16 store
   (`compute_features(..., feature_dtype=...)`, the path `g2is grads --dtype bfloat16
   --feature-dtype bfloat16` runs), sparse projection to d = 8192;
3. scores the first `--n-loss` pool records with both models (`evaluate_records`, base +
   adapters, and the base model alone) and prints the per-record loss difference (max and mean
   absolute);
4. prints the cosine between each record's bfloat16 and float32 feature row (median and worst,
   over the pool rows and the dev rows), and the same for float32 features merely stored in
   bfloat16 (the rounding of the store alone);
5. selects `--ratio` of the pool with g2is and with less from each set of features (V from the
   dev rows) and prints the overlap |S_bf16 ∩ S_f32| / |S_f32|.

Everything runs on whatever JAX device is present; on the 2-core CPU it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-pool", type=int, default=256)
    ap.add_argument("--n-loss", type=int, default=64)
    ap.add_argument("--n-dev", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--out", help="keep the stores here (default: a temporary directory)")
    args = ap.parse_args()

    from g2is_jax.data import load_records, suite
    from g2is_jax.evaluate import evaluate_records
    from g2is_jax.featurize import compute_features
    from g2is_jax.models.loading import load_model
    from g2is_jax.projection import Projector
    from g2is_jax.select import g2is_select, less_select
    from g2is_jax.store import read_features
    from g2is_jax.train import load_checkpoint, resolve_train_config, train_lora

    t0 = time.perf_counter()
    root = Path(args.out or tempfile.mkdtemp(prefix="bf16-check-"))
    files = suite(root / "data", n_pool=args.n_pool, n_dev=args.n_dev, n_test=1,
                  target="arithmetic", target_share=0.1, system="Answer briefly.")
    pool, dev = load_records(files.pool), load_records(files.dev["arithmetic"])
    cfg = resolve_train_config("cpu", fraction=0.25, epochs=1, grad_accum=1,
                               max_length=args.max_length)
    models = {d: load_model(args.model, dtype=d) for d in ("float32", "bfloat16")}
    warm = train_lora(models["float32"][0], models["float32"][1], pool, root / "warmup", cfg,
                      progress=False)
    ckpt = warm.checkpoints[-1]
    projector = Projector(kind="sparse", dim=args.dim, seed=0)
    feats, losses = {}, {}
    for dtype, (model, tok) in models.items():
        tuned, moments, meta = load_checkpoint(model, ckpt)
        for role, records, kind in (("pool", pool, "adam"), ("dev", dev, "sgd")):
            out = root / f"{role}-{dtype}"
            compute_features(tuned, tok, records, out, gradient=kind, projector=projector,
                             moments=moments if kind == "adam" else None, batch_size=8,
                             max_length=args.max_length, overwrite=True, progress=False,
                             feature_dtype=dtype)
            feats[role, dtype] = read_features(out).array
        losses[dtype] = evaluate_records(tuned, tok, pool[: args.n_loss], batch_size=8,
                                         max_length=args.max_length, progress=False).loss
        losses["base", dtype] = evaluate_records(model, tok, pool[: args.n_loss], batch_size=8,
                                                 max_length=args.max_length,
                                                 progress=False).loss
    diff = np.abs(losses["bfloat16"] - losses["float32"])
    base_diff = np.abs(losses["base", "bfloat16"] - losses["base", "float32"])
    report: dict = {"model": args.model, "n_pool": len(pool), "n_dev": len(dev),
                    "n_loss": int(diff.size), "max_length": args.max_length,
                    "mean_loss_f32": float(losses["float32"].mean()),
                    "loss_abs_diff_max": float(diff.max()),
                    "loss_abs_diff_mean": float(diff.mean()),
                    "base_model_loss_abs_diff_max": float(base_diff.max()),
                    "base_model_loss_abs_diff_mean": float(base_diff.mean())}
    for role in ("pool", "dev"):
        f32, b16 = feats[role, "float32"], feats[role, "bfloat16"]
        assert b16.dtype == ml_dtypes.bfloat16
        c = cosines(f32, b16)
        stored = cosines(f32, np.asarray(f32, np.float32).astype(ml_dtypes.bfloat16))
        report[f"cos_{role}"] = {"median": float(np.median(c)), "worst": float(c.min())}
        report[f"cos_{role}_store_only"] = {"median": float(np.median(stored)),
                                            "worst": float(stored.min())}
    for method in ("g2is", "less"):
        picks = {}
        for dtype in ("float32", "bfloat16"):
            t, v = feats["pool", dtype], feats["dev", dtype]
            res = g2is_select(t, v, ratio=args.ratio) if method == "g2is" else \
                less_select([t], [v], ratio=args.ratio)
            picks[dtype] = {int(i) for i in res.indices if i >= 0}
        same = len(picks["float32"] & picks["bfloat16"])
        report[f"overlap_{method}"] = {"selected": len(picks["float32"]), "shared": same,
                                       "fraction": same / max(1, len(picks["float32"]))}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
