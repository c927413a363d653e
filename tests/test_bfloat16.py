"""bfloat16 end to end: `--dtype bfloat16` (weights and compute) and `--feature-dtype bfloat16`
(the stored rows) against float32, through the CLI, with stated bounds; the bfloat16 store.

The bound (tiny random model, `tiny_model_config`, a PEFT adapter of rank 4 on q,k,v,o with
random factors, 24 pool records of <= 64 tokens, sgd features projected to d = 512): measured
here, the worst per-record cosine between the bfloat16 and float32 feature rows is 0.99995
(median 0.99997) and the largest per-record loss difference 6.7e-4 (losses ~6.0); a variant
(32 records up to 128 tokens, d = 512, seeds 0, 1, 2 of weights, adapter and records) gave at
worst 0.99996 and 8.3e-4. The test asserts cosine > 0.9995 and loss difference < 5e-3, about
10× and 6× those: room for other CPUs' summation orders, while a loss held in bfloat16 anywhere
(spacing 2^-5 near 6, so errors up to 0.016) would fail. It also asserts that the two runs
differ at all, so that a `--dtype` silently ignored cannot pass.
SmolLM2-135M's numbers (larger errors: 30 layers, trained weights) are in the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from g2is_jax import cli
from g2is_jax.errors import G2ISError
from g2is_jax.store import merge_shards, open_store, read_features, save_shard_rows

COS_BOUND, LOSS_BOUND = 0.9995, 5e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from g2is_jax.data import build_pool, encode_record, write_jsonl
    from g2is_jax.testing import tiny_hf_model_dir, tiny_peft_adapter_dir, tiny_tokenizer

    root = tmp_path_factory.mktemp("bf16")
    tok = tiny_tokenizer()
    model_dir = tiny_hf_model_dir(root / "model")
    adapter = tiny_peft_adapter_dir(root / "adapter", seed=0)
    records = [r for r in build_pool(80, seed=0)
               if encode_record(r, tok, max_length=256).input_ids.shape[0] <= 64][:24]
    assert len(records) == 24
    data = write_jsonl(records, root / "pool.jsonl")
    out = {}
    for dtype in ("float32", "bfloat16"):
        assert cli.main(["grads", "--model", str(model_dir), "--data", str(data), "--adapter",
                         str(adapter), "--gradient", "sgd", "--projection", "sparse", "--dim",
                         "512", "--batch-size", "8", "--max-length", "64", "--dtype", dtype,
                         "--feature-dtype", dtype, "--out", str(root / f"feats-{dtype}")]) == 0
        assert cli.main(["evaluate", "--model", str(model_dir), "--adapter", str(adapter),
                         "--data", str(data), "--max-length", "64", "--dtype", dtype,
                         "--out", str(root / f"eval-{dtype}.jsonl")]) == 0
        feats = read_features(root / f"feats-{dtype}")
        lines = (root / f"eval-{dtype}.jsonl").read_text().splitlines()
        loss = np.array([json.loads(x)["loss"] for x in lines if '"index"' in x])
        out[dtype] = feats, loss
    return root, out


def test_bfloat16_features_and_losses_stay_within_the_bound(setup):
    _, out = setup
    (f32, loss32), (b16, loss16) = out["float32"], out["bfloat16"]
    assert f32.array.dtype == np.float32 and b16.array.dtype == ml_dtypes.bfloat16
    assert f32.meta.dtype == "float32" and b16.meta.dtype == "bfloat16"
    assert b16.meta["model_dtype"] == "bfloat16" and f32.meta["model_dtype"] == "float32"
    a, b = np.asarray(f32.array, np.float64), np.asarray(b16.array, np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    diff = np.abs(loss16 - loss32)
    print(f"cosine median {np.median(cos):.6f} worst {cos.min():.6f}; loss diff max "
          f"{diff.max():.2e} mean {diff.mean():.2e}")
    assert loss32.shape == (24,) and np.isfinite(loss32).all()
    assert cos.min() > COS_BOUND
    assert diff.max() < LOSS_BOUND
    assert cos.max() < 1 - 1e-7 and diff.max() > 0  # bfloat16 really ran


def test_bfloat16_store_is_half_the_bytes_and_reads_back(setup):
    root, _ = setup
    f32 = (root / "feats-float32" / "features.npy").stat().st_size
    b16 = (root / "feats-bfloat16" / "features.npy").stat().st_size
    assert b16 < 0.51 * f32
    raw = np.load(root / "feats-bfloat16" / "features.npy")  # what np.save of bfloat16 writes
    assert raw.dtype == np.dtype("V2") and raw.shape == (24, 512)


def test_selection_runs_on_bfloat16_features(setup, tmp_path):
    root, out = setup
    np.save(tmp_path / "val.npy", np.asarray(out["float32"][0].array[:3]))
    assert cli.main(["select", "--train-features", str(root / "feats-bfloat16"),
                     "--val-features", str(tmp_path / "val.npy"), "--ratio", "0.25",
                     "--out", str(tmp_path / "sel")]) == 0
    got = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert len([i for i in got["indices"] if i >= 0]) == 6


def test_store_rounds_rows_to_bfloat16_and_refuses_another_dtype_on_resume(tmp_path):
    rows = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with open_store(tmp_path / "s", {}, 5, 4, dtype="bfloat16") as store:
        store.write(0, rows[:2])
        with pytest.raises(G2ISError, match="non-finite"):  # finite in float32, not in bf16
            store.write(2, np.full((1, 4), 3.4e38, np.float32))
    with pytest.raises(G2ISError, match="dtype"):
        open_store(tmp_path / "s", {}, 5, 4, dtype="float32")
    with open_store(tmp_path / "s", {}, 5, 4, dtype="bfloat16") as store:
        assert store.written([0, 1, 2]).tolist() == [True, True, False]
        store.write(2, rows[2:])
        store.finalize()
    fs = read_features(tmp_path / "s")
    assert fs.meta.dtype == "bfloat16"
    np.testing.assert_array_equal(fs.array, rows.astype(ml_dtypes.bfloat16))
    with pytest.raises(G2ISError, match="feature dtype must be one of float32, bfloat16"):
        open_store(tmp_path / "t", {}, 5, 4, dtype="float16")


def test_merged_shards_keep_bfloat16(tmp_path):
    rows = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    dirs = []
    for part, idx in enumerate((np.array([0, 2, 4]), np.array([1, 3, 5]))):
        d = tmp_path / f"shard{part}"
        with open_store(d, {"shard": {"part": part}}, 3, 3, dtype="bfloat16") as store:
            store.write(0, rows[idx])
            store.finalize()
        save_shard_rows(d, idx)
        dirs.append(d)
    merged = read_features(Path(merge_shards(tmp_path / "out", dirs)).parent)
    assert merged.meta.dtype == "bfloat16"
    np.testing.assert_array_equal(merged.array, rows.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("text,match", [
    ('dtype = "float16"\n[suite]\n', r"dtype must be one of float32, bfloat16, got 'float16'"),
    ('[suite]\n[features]\ndtype = "fp8"\n', r"features.dtype must be one of float32, bfloat16"),
])
def test_run_config_dtypes_are_checked(tmp_path, text, match):
    from g2is_jax.runconfig import load_run_config

    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(G2ISError, match=match):
        load_run_config(path)
    cfg = load_run_config(None, ["suite.n_pool=50", "dtype=bfloat16", "features.dtype=bfloat16"])
    assert cfg.dtype == "bfloat16" and cfg.features.dtype == "bfloat16"
