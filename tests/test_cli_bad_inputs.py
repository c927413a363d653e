"""Every subcommand against a table of bad inputs (issue 12's probes): exit status 2, the error on
one line of stderr, no traceback, and no file created or changed. In-process (`main(argv)`) with
the working directory in a fresh temporary folder; nothing here loads a model."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from g2is_jax.cli import main

POOL = [{"id": f"p{i}", "prompt": f"question {i}", "completion": f"answer {i}"} for i in range(8)]


def _pool(tmp, name="pool.jsonl"):
    (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in POOL))


def _feats(tmp):
    from g2is_jax.store import file_sha256, write_features

    _pool(tmp)
    rng = np.random.default_rng(0)
    write_features(tmp / "t", rng.standard_normal((8, 4)).astype(np.float32),
                   {"gradient": "adam", "record_ids": [r["id"] for r in POOL],
                    "data_sha256": file_sha256(tmp / "pool.jsonl"), "checkpoint_lr": 1e-4})
    np.save(tmp / "v.npy", rng.standard_normal((2, 4)).astype(np.float32))
    np.save(tmp / "v5.npy", rng.standard_normal((2, 5)).astype(np.float32))
    (tmp / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in POOL[:5]))


def _forty(tmp):
    _feats(tmp)
    meta = json.loads((tmp / "t" / "meta.json").read_text())
    (tmp / "t" / "meta.json").write_text(json.dumps({**meta, "n": "forty"}))


def _nan(tmp):
    _feats(tmp)
    (tmp / "nan").mkdir()
    x = np.ones((8, 4), np.float32)
    x[[1, 6]] = np.nan
    np.save(tmp / "nan" / "features.npy", x)
    (tmp / "nan" / "meta.json").write_text(json.dumps(
        {"n": 8, "dim": 4, "record_ids": [r["id"] for r in POOL]}))


def _rand(tmp):
    _feats(tmp)
    (tmp / "rand.npy").write_bytes(np.random.default_rng(1).bytes(500))


def _read_only(tmp, monkeypatch):
    class RO:  # as root a chmod'ed folder stays writable: simulate a read-only mount
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(os, "statvfs", lambda p: RO())


def _full_disk(tmp, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


SETUPS = {
    "none": lambda t: None,
    "file": lambda t: (t / "f").write_text("x"),
    "dir": lambda t: (t / "d").mkdir(),
    "pool": _pool,
    "deep": lambda t: (t / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n"),
    "blank": lambda t: (t / "blank.jsonl").write_text("\n  \n\n"),
    "latin1": lambda t: (t / "latin1.jsonl").write_bytes(
        b'{"prompt": "caf\xe9", "completion": "x"}\n'),
    "feats": _feats,
    "forty": _forty,
    "nan": _nan,
    "rand": _rand,
    "config": lambda t: (t / "run.toml").write_text(
        "[suite]\nn_pool = 10\n[select]\nratio = 0.1\n"),
}
PATCHES = {"read-only": _read_only, "full-disk": _full_disk}

TF = ["--train-features", "t", "--val-features", "v.npy"]
# (setup, patch, argv, the error must contain)
LLAMA = str(Path(__file__).resolve().parents[1] / "examples" / "llama-3.1-8b" / "config.json")
CASES = [
    # suite
    ("file", None, ["suite", "--out", "f"], "is a file, not a directory"),
    ("file", None, ["suite", "--out", "f/sub"], "is a file, not a directory"),
    ("none", None, ["suite", "--out", "s", "--n-pool", "0"], "pool size must be a positive"),
    ("none", None, ["suite", "--out", "s", "--target-share", "2"], "target_share"),
    ("none", "read-only", ["suite", "--out", "s"], "read-only file system"),
    ("none", "full-disk", ["suite", "--out", "s"], "no space left on the device"),
    ("none", None, ["suite", "--out", "s", "--n-pool", "many"], "invalid int value"),
    # data-check
    ("none", None, ["data-check", "missing.jsonl"], "no such file"),
    ("deep", None, ["data-check", "deep.jsonl"], "nested too deeply"),
    ("blank", None, ["data-check", "blank.jsonl"], "only blank lines"),
    ("latin1", None, ["data-check", "latin1.jsonl"], "not valid UTF-8"),
    ("pool", None, ["data-check", "pool.jsonl", "--max-length", "1"], "must be at least 2"),
    # evaluate
    ("dir", None, ["evaluate", "--data", "pool.jsonl", "--out", "d"], "is a directory"),
    ("file", None, ["evaluate", "--data", "pool.jsonl", "--out", "f/x.jsonl"],
     "is a file, not a directory"),
    ("pool", "read-only", ["evaluate", "--data", "pool.jsonl", "--out", "x.jsonl"],
     "read-only file system"),
    ("pool", None, ["evaluate", "--data", "pool.jsonl", "--out", "x.jsonl", "--batch-size", "0"],
     "--batch-size"),
    ("pool", None, ["evaluate", "--data", "pool.jsonl", "--out", "x.jsonl", "--limit", "0"],
     "--limit"),
    ("none", None, ["evaluate", "--data", "missing.jsonl", "--out", "x.jsonl"], "no such file"),
    ("deep", None, ["evaluate", "--data", "deep.jsonl", "--out", "x.jsonl"], "nested too deeply"),
    # warmup and train
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--lr", "nan"],
     "--lr must be a finite number"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--lr", "-1"], "--lr"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--epochs", "0"], "--epochs"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--fraction", "0"],
     "--fraction"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--warmup-ratio", "1.5"],
     "--warmup-ratio"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--lora-rank", "0"],
     "--lora-rank"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--lora-alpha", "inf"],
     "--lora-alpha"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--lora-targets", "q,zz"],
     "unknown LoRA target"),
    ("file", None, ["warmup", "--data", "pool.jsonl", "--out", "f"], "is a file"),
    ("pool", "read-only", ["warmup", "--data", "pool.jsonl", "--out", "w"], "read-only"),
    ("none", None, ["warmup", "--data", "missing.jsonl", "--out", "w"], "no such file"),
    ("deep", None, ["warmup", "--data", "deep.jsonl", "--out", "w"], "nested too deeply"),
    ("pool", None, ["warmup", "--data", "pool.jsonl", "--out", "w", "--model", "nope"],
     "model 'nope' not found"),
    ("pool", None, ["train", "--data", "pool.jsonl", "--out", "w", "--lr", "inf"], "--lr"),
    ("file", None, ["train", "--data", "pool.jsonl", "--out", "f"], "is a file"),
    ("blank", None, ["train", "--data", "blank.jsonl", "--out", "w"], "only blank lines"),
    # grads
    ("pool", None, ["grads", "--data", "pool.jsonl", "--out", "g"], "--checkpoint"),
    ("pool", None, ["grads", "--data", "pool.jsonl", "--out", "g", "--gradient", "adam",
                    "--adapter", "a"], "needs a warmup --checkpoint"),
    ("pool", None, ["grads", "--data", "pool.jsonl", "--out", "g", "--gradient",
                    "representation", "--batch-size", "0"], "--batch-size"),
    ("pool", None, ["grads", "--data", "pool.jsonl", "--out", "g", "--checkpoint", "c",
                    "--dim", "0"], "--dim"),
    ("file", None, ["grads", "--data", "pool.jsonl", "--out", "f", "--gradient",
                    "representation"], "is a file"),
    ("pool", None, ["grads", "--data", "pool.jsonl", "--out", "g", "--gradient",
                    "representation", "--model", "nope"], "model 'nope' not found"),
    ("none", None, ["grads", "--data", "missing.jsonl", "--out", "g", "--gradient",
                    "representation"], "no such file"),
    # plan
    ("none", None, ["plan", "--model", "missing.json", "--batch-size", "8", "--max-length",
                    "64"], "not found"),
    ("none", None, ["plan", "--model", LLAMA, "--batch-size", "0", "--max-length", "64",
                    "--no-compile"], "batch_size must be an integer ≥ 1, got 0 (set by "
                                     "--batch-size)"),
    ("none", None, ["plan", "--model", LLAMA, "--batch-size", "8", "--max-length", "64",
                    "--mesh", "data=2,fsdp=x"], "cannot read mesh"),
    ("none", None, ["plan", "--model", LLAMA, "--batch-size", "8", "--max-length", "64",
                    "--device-memory", "-1"], "device_memory must be a positive number"),
    ("none", None, ["plan", "--model", LLAMA, "--batch-size", "8", "--max-length", "64",
                    "--lora-targets", "q,x", "--no-compile"], "'x'"),
    # graph
    ("feats", None, ["graph", "--train-features", "t", "--out", "t"], "is a directory"),
    ("rand", None, ["graph", "--train-features", "rand.npy", "--out", "g.npz"],
     "not a .npy array file"),
    ("none", None, ["graph", "--train-features", "missing", "--out", "g.npz"], "not found"),
    ("feats", None, ["graph", "--train-features", "t", "--out", "g.npz", "--neighbors", "0"],
     "neighbors"),
    ("forty", None, ["graph", "--train-features", "t", "--out", "g.npz"], "'n' must be"),
    # select
    ("feats", None, ["select", *TF, "--out", "pool.jsonl"], "is a file, not a directory"),
    ("rand", None, ["select", "--train-features", "rand.npy", "--val-features", "v.npy",
                    "--out", "s"], "not a .npy array file"),
    ("forty", None, ["select", *TF, "--out", "s"], "'n' must be an integer"),
    ("nan", None, ["select", "--train-features", "nan", "--val-features", "v.npy", "--out",
                   "s"], "2 row(s): p1 (row 1), p6 (row 6)"),
    ("feats", None, ["select", "--train-features", "t", "--val-features", "v5.npy", "--out",
                     "s"], "dimensions disagree"),
    ("feats", None, ["select", *TF, "--out", "s", "--ratio", "2"], "ratio"),
    ("feats", None, ["select", *TF, "--out", "s", "--delta", "0"], "delta"),
    ("feats", None, ["select", *TF, "--out", "s", "--data", "short.jsonl"], "5 records"),
    ("feats", "read-only", ["select", *TF, "--out", "s"], "read-only file system"),
    ("feats", "full-disk", ["select", *TF, "--out", "s", "--method", "random", "--ratio", "0.5"],
     "no space left on the device"),
    # run and demo
    ("file", None, ["run", "--out", "f", "--set", "suite.seed=0"], "is a file"),
    ("none", None, ["run", "--out", "r", "--config", "missing.toml"], "does not exist"),
    ("config", None, ["run", "--out", "r", "--config", "run.toml"], "unknown key(s) ['ratio']"),
    ("none", None, ["run", "--out", "r", "--set", "suite.seed=0", "--set",
                    "warmup.learning_rate=nan"], "[warmup] learning_rate must be a finite"),
    ("none", None, ["run", "--out", "r", "--set", "suite.seed=0", "--set",
                    "finetune.lora_rank=0"], "[finetune] lora_rank"),
    ("file", None, ["demo", "--out", "f"], "is a file"),
    ("none", None, ["demo", "--out", "r", "--ratio", "0"], "ratios must be in (0, 1]"),
]


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _id(case):
    setup, patch, argv, _ = case
    return "-".join([argv[0], setup, *(a.lstrip("-") for a in argv[1:] if a.startswith("--"))]
                    + ([patch] if patch else []))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bad_input_exits_2_with_one_line_and_no_files(case, tmp_path, monkeypatch, capsys):
    setup, patch, argv, match = case
    monkeypatch.chdir(tmp_path)
    SETUPS[setup](tmp_path)
    before = _tree(tmp_path)
    if patch:
        PATCHES[patch](tmp_path, monkeypatch)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    monkeypatch.undo()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert rc == 2, err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"g2is {argv[0]}: error: ") and match in errors[0], errors[0]
    assert "Traceback" not in err
    assert _tree(tmp_path) == before, "the command created or changed files"


def test_every_subcommand_is_in_the_table():
    from g2is_jax.cli import _COMMANDS

    assert {c.replace("_", "-") for c in _COMMANDS} == {argv[0] for _, _, argv, _ in CASES}
