"""The command line end to end at tiny size: suite → warmup → grads (adam, sgd,
representation) → select (g2is, rds) → evaluate, on a random tiny model saved as an HF
checkpoint directory. Every artefact is checked, not just the exit codes."""

import json

import numpy as np
import pytest

from g2is_jax.cli import main
from g2is_jax.testing import tiny_hf_model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = tiny_hf_model_dir(root / "model")
    data = root / "data"
    assert main(["suite", "--out", str(data), "--n-pool", "40", "--n-dev", "4",
                 "--n-test", "4", "--target", "arithmetic", "--target-share", "0.25"]) == 0
    common = ["--model", str(model_dir), "--max-length", "128"]
    assert main(["warmup", *common, "--data", str(data / "pool.jsonl"), "--out",
                 str(root / "warm"), "--preset", "cpu", "--fraction", "0.5", "--epochs", "1",
                 "--lora-rank", "4", "--batch-size", "4", "--grad-accum", "1"]) == 0
    ckpt = root / "warm" / "checkpoints" / "1"
    feats = {}
    for name, data_file, kind in (("pool", "pool.jsonl", "adam"),
                                  ("dev", "arithmetic.dev.jsonl", "sgd"),
                                  ("pool_rep", "pool.jsonl", "representation"),
                                  ("dev_rep", "arithmetic.dev.jsonl", "representation")):
        extra = [] if kind == "representation" else ["--checkpoint", str(ckpt)]
        out = root / "feats" / name
        assert main(["grads", *common, "--data", str(data / data_file), "--out", str(out),
                     "--gradient", kind, "--projection", "sparse", "--dim", "64",
                     "--batch-size", "4", *extra]) == 0
        feats[name] = out
    return root, data, model_dir, ckpt, feats


def test_feature_stores(run):
    root, data, _, ckpt, feats = run
    pool = np.load(feats["pool"] / "features.npy")
    meta = json.loads((feats["pool"] / "meta.json").read_text())
    assert pool.shape == (40, 64) and np.isfinite(pool).all() and np.abs(pool).sum() > 0
    assert meta["gradient"] == "adam" and meta["checkpoint_lr"] > 0
    assert meta["checkpoint"].endswith("checkpoints/1")
    rep = np.load(feats["pool_rep"] / "features.npy")
    assert rep.shape == (40, 32)  # hidden size, unprojected


@pytest.mark.parametrize("method,t,v", [("g2is", "pool", "dev"), ("less", "pool", "dev"),
                                        ("rds", "pool_rep", "dev_rep")])
def test_select_writes_selection_and_subset(run, method, t, v):
    root, data, _, _, feats = run
    out = root / f"sel_{method}"
    assert main(["select", "--train-features", str(feats[t]), "--val-features", str(feats[v]),
                 "--method", method, "--ratio", "0.1", "--out", str(out),
                 "--data", str(data / "pool.jsonl")]) == 0
    sel = json.loads((out / "selection.json").read_text())
    idx = sel["indices"]
    assert 0 < len(idx) <= 4 and len(set(idx)) == len(idx)
    lines = (data / "pool.jsonl").read_text().splitlines(keepends=True)
    assert (out / "selected.jsonl").read_text() == "".join(lines[i] for i in idx)


def test_sign_rules_on_model_features(run):
    """On gradient features of a (tiny) model: `g2is select --pca-sign` v-based and u-based both
    run and equal the library's selection under that rule; selection.json records the rule and
    the V normalisation; the sign-free methods write identical indices under both rules."""
    from g2is_jax import g2is_select

    root, data, _, _, feats = run
    from g2is_jax.select import core_knowledge

    t = np.load(feats["pool"] / "features.npy")
    v = np.load(feats["dev"] / "features.npy")
    kv, ku = (core_knowledge(v / np.linalg.norm(v, axis=1, keepdims=True), pca_sign=r)
              for r in ("v-based", "u-based"))
    flipped = (kv.components * ku.components).sum(axis=1) < 0
    print("components the two rules orient oppositely:", flipped.tolist())
    assert flipped.any()  # else this data could not tell a sign-free method from g2is
    got = {}
    for method in ("g2is", "g2is-robust", "g2is-abs"):
        for rule in ("v-based", "u-based"):
            out = root / f"sign_{method}_{rule}"
            assert main(["select", "--train-features", str(feats["pool"]), "--val-features",
                         str(feats["dev"]), "--method", method, "--ratio", "0.25",
                         "--pca-sign", rule, "--val-normalize", "unit", "--out", str(out)]) == 0
            sel = json.loads((out / "selection.json").read_text())
            assert sel["conventions"]["pca_sign"] == rule
            assert sel["conventions"]["val_normalize"] == "unit"
            assert len(sel["indices"]) == 10 and len(set(sel["indices"])) == 10
            got[method, rule] = sel["indices"]
        if method == "g2is":
            for rule in ("v-based", "u-based"):
                want = g2is_select(t, v, ratio=0.25, pca_sign=rule).indices.tolist()
                assert got[method, rule] == want
        else:
            assert got[method, "v-based"] == got[method, "u-based"]


def test_evaluate_with_the_warmup_adapter(run, capsys):
    root, data, model_dir, ckpt, _ = run
    out = root / "eval.jsonl"
    assert main(["evaluate", "--model", str(model_dir), "--adapter", str(ckpt), "--data",
                 str(data / "arithmetic.test.jsonl"), "--out", str(out), "--generate",
                 "--max-new-tokens", "4", "--max-length", "128"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["n_tokens"] > 0 and "exact_match" in r
               for r in rows)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert summary["n"] == 4


def test_grads_without_adapter_is_a_user_error(run, capsys):
    root, data, model_dir, _, _ = run
    rc = main(["grads", "--model", str(model_dir), "--data", str(data / "pool.jsonl"),
               "--out", str(root / "x"), "--gradient", "sgd"])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err


def test_train_on_the_selection_exports_a_peft_adapter(run):
    root, data, model_dir, _, feats = run
    sel = root / "sel_train"
    assert main(["select", "--train-features", str(feats["pool"]), "--val-features",
                 str(feats["dev"]), "--method", "g2is", "--ratio", "0.1", "--out", str(sel),
                 "--data", str(data / "pool.jsonl")]) == 0
    out = root / "ft"
    assert main(["train", "--model", str(model_dir), "--data", str(sel / "selected.jsonl"),
                 "--out", str(out), "--preset", "cpu-finetune", "--epochs", "2",
                 "--lora-rank", "4", "--batch-size", "4"]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and (out / "checkpoints" / "2").exists()
    ev = root / "ft_eval.jsonl"
    assert main(["evaluate", "--model", str(model_dir), "--adapter", str(out / "adapter"),
                 "--data", str(sel / "selected.jsonl"), "--out", str(ev),
                 "--max-length", "128"]) == 0
    assert len(ev.read_text().splitlines()) == len(json.loads(
        (sel / "selection.json").read_text())["indices"])
