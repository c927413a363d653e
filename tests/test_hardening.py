"""Issue 12 (hardening), regression tests at tiny size: a resumed `g2is grads` never mixes two
models; every bad record is named; training stops on a non-finite loss keeping the last finite
checkpoint; `select` writes its folder as one set from the records grads read (BOM, JSON arrays);
feature files are read by one schema-checked reader; logging is the CLI's own."""

import dataclasses
import errno
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

import g2is_jax.store as store_mod
import g2is_jax.train as train_mod
from g2is_jax.cli import main, setup_logging
from g2is_jax.data import Message, build_pool, load_records, write_jsonl
from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.llama import init_model
from g2is_jax.models.loading import load_model, save_hf_checkpoint
from g2is_jax.store import file_sha256, open_store, write_features
from g2is_jax.testing import tiny_tokenizer
from g2is_jax.train import TrainConfig, load_checkpoint, train_lora

TRAIN = TrainConfig(fraction=1.0, epochs=1, learning_rate=1e-3, warmup_ratio=0.0, batch_size=4,
                    grad_accum=2, max_length=128, seed=0,
                    lora=LoraConfig(rank=2, alpha=4.0, dropout=0.0))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, eos_token_id=tok.eos_token_id)
    a = save_hf_checkpoint(init_model(cfg, seed=0), tok, root / "models" / "a")
    b = save_hf_checkpoint(init_model(cfg, seed=1), tok, root / "models" / "b")
    records = build_pool(12, seed=3)
    pool = write_jsonl(records, root / "pool.jsonl")
    model, tok = load_model(a)
    # Two warmups of the same length and schedule: the same learning rate, other adapters.
    warm = [train_lora(model, tok, records, root / f"warm{s}",
                       dataclasses.replace(TRAIN, seed=s), progress=False) for s in (0, 1)]
    assert warm[0].epoch_lrs == warm[1].epoch_lrs
    return {"root": root, "a": a, "b": b, "pool": pool, "records": records, "model": model,
            "tok": tok, "ckpt": [w.checkpoints[-1] for w in warm]}


def _grads(model, out, ckpt, data):
    return ["grads", "--model", str(model), "--data", str(data), "--out", str(out),
            "--checkpoint", str(ckpt), "--gradient", "sgd", "--projection", "sparse",
            "--dim", "16", "--batch-size", "4", "--max-length", "128"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_resumed_grads_never_mixes_two_models(env, tmp_path, monkeypatch, capsys):
    """Issue 12.1, in its three forms, and the converse (`dir/` is `dir`)."""
    work = tmp_path / "work"
    shutil.copytree(env["a"], work / "model")
    shutil.copytree(env["ckpt"][0], work / "ckpt")
    out = work / "feats"
    monkeypatch.chdir(work)
    # An interrupted run: one batch committed.
    real_write = store_mod.FeatureStore.write

    def write_once(self, *a, **k):
        real_write(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.FeatureStore, "write", write_once)
    assert main(_grads("model", out, "ckpt", env["pool"])) == 130
    monkeypatch.setattr(store_mod.FeatureStore, "write", real_write)
    assert (out / "rows.journal").stat().st_size > 0 and not (out / "features.npy").exists()
    capsys.readouterr()

    # (a) other weights at the same path
    shutil.copy(env["b"] / "model.safetensors", work / "model" / "model.safetensors")
    assert main(_grads("model", out, "ckpt", env["pool"])) == 2
    assert "the model's weights and config changed" in _err_line(capsys)
    shutil.copy(env["a"] / "model.safetensors", work / "model" / "model.safetensors")

    # (b) the checkpoint folder replaced by another warmup with the same learning rate
    shutil.rmtree(work / "ckpt")
    shutil.copytree(env["ckpt"][1], work / "ckpt")
    assert main(_grads("model", out, "ckpt", env["pool"])) == 2
    assert "LoRA adapter weights" in _err_line(capsys)
    shutil.rmtree(work / "ckpt")
    shutil.copytree(env["ckpt"][0], work / "ckpt")

    # (c) the same relative --model typed in another working directory
    other = tmp_path / "elsewhere"
    shutil.copytree(env["b"], other / "model")
    monkeypatch.chdir(other)
    assert main(_grads("model", out, work / "ckpt", env["pool"])) == 2
    assert "the model's weights and config changed" in _err_line(capsys)

    # The same model typed as `dir/` resumes, says so at the default log level, and finishes
    # with the bytes of an uninterrupted run.
    assert main(_grads(f"{work / 'model'}/", out, work / "ckpt", env["pool"])) == 0
    assert "resuming: 1 of" in capsys.readouterr().err
    ref = tmp_path / "ref"
    assert main(_grads(env["a"], ref, env["ckpt"][0], env["pool"])) == 0
    assert (out / "features.npy").read_bytes() == (ref / "features.npy").read_bytes()


def test_every_non_finite_record_is_named(env, tmp_path):
    """Issue 12.9: records whose gradients are NaN are all named, not just the first batch's;
    the other batches are stored and the store stays resumable."""
    from g2is_jax.featurize import compute_features
    from g2is_jax.projection import Projector

    model, tok = env["model"], env["tok"]
    tuned, _, _ = load_checkpoint(model, env["ckpt"][0])
    poison = tok.encode("€", add_special_tokens=False)
    emb = tuned.embed_tokens.embedding
    emb[...] = emb[...].at[np.array(poison)].set(np.nan)
    records = list(env["records"])
    bad = [1, 6, 10]
    for i in bad:
        r = records[i]
        msgs = tuple(Message(m.role, m.content + " €" if m.role == "user" else m.content)
                     for m in r.messages)
        records[i] = dataclasses.replace(r, messages=msgs)
    with pytest.raises(G2ISError) as e:
        compute_features(tuned, tok, records, tmp_path / "s", gradient="sgd",
                         projector=Projector(kind="sparse", dim=16), batch_size=4, max_length=128,
                         progress=False)
    msg = str(e.value)
    assert msg.startswith("non-finite gradients for 3 record(s): ") and "\n" not in msg
    assert all(records[i].id in msg for i in bad)
    with open_store(tmp_path / "s", json.loads((tmp_path / "s" / "meta.json").read_text()),
                    12, int(json.loads((tmp_path / "s" / "meta.json").read_text())["dim"]),
                    ignore=("package_version", "jax_version")) as st:
        assert 0 < st.num_written < 12 - 3 + 1 and not st.written(bad).any()


def test_non_finite_training_stops_and_keeps_the_last_finite_checkpoint(env, tmp_path,
                                                                       monkeypatch):
    """Issue 12.4: NaN is refused before training; a diverging run stops with the step named,
    and the checkpoints of the epochs before stay."""
    model, tok, records = env["model"], env["tok"], env["records"]
    with pytest.raises(G2ISError, match="learning_rate must be a finite number"):
        dataclasses.replace(TRAIN, learning_rate=float("nan"))
    # A real divergence: lr 1e30 overflows the adapters after the first update.
    with pytest.raises(G2ISError, match=r"training diverged in epoch 1: the (loss is (nan|inf)|"
                                        r"adapter weights).*no checkpoint was written"):
        train_lora(model, tok, records, tmp_path / "big",
                   dataclasses.replace(TRAIN, learning_rate=1e30, epochs=2), progress=False)
    assert not (tmp_path / "big" / "checkpoints" / "1").exists()
    # A loss that turns NaN in epoch 2: epoch 1's checkpoint is kept and named.
    real_step, real_save, saved = train_mod._train_step, train_mod._save, []

    def step(*args):
        lora, opt_state, loss = real_step(*args)
        return lora, opt_state, loss * np.nan if saved else loss

    def save(*args):
        real_save(*args)
        saved.append(args[1])

    monkeypatch.setattr(train_mod, "_train_step", step)
    monkeypatch.setattr(train_mod, "_save", save)
    with pytest.raises(G2ISError) as e:
        train_lora(model, tok, records, tmp_path / "late",
                   dataclasses.replace(TRAIN, epochs=3), progress=False)
    msg = str(e.value)
    assert saved == [1]
    assert re.match(r"training diverged in epoch 2: the loss is nan at micro-batch 1/\d+ "
                    r"\(optimizer update \d+, lr [\d.e-]+\); stopped, the last finite "
                    r"checkpoint is ", msg), msg
    assert str(tmp_path / "late" / "checkpoints" / "1") in msg and "\n" not in msg
    assert (tmp_path / "late" / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "late" / "checkpoints" / "2").exists()


def test_tiny_fraction_trains_at_a_nonzero_rate_and_says_so(env, tmp_path, caplog):
    """Issue 12.11: `--fraction 0.01` of 6 records trained one update at learning rate 0."""
    model, tok = env["model"], env["tok"]
    cfg = dataclasses.replace(TRAIN, fraction=0.01, epochs=2, warmup_ratio=0.03)
    with caplog.at_level(logging.WARNING, logger="g2is_jax.train"):
        res = train_lora(model, tok, env["records"][:6], tmp_path / "t", cfg, progress=False)
    assert "training on 1 record" in caplog.text and "span epochs" in caplog.text
    assert res.epoch_lrs[-1] == pytest.approx(cfg.learning_rate)
    b = [np.asarray(x) for p, x in _lora_b(res.model)]
    assert any(np.abs(x).max() > 0 for x in b)  # the adapters moved off their zero init
    with pytest.raises(G2ISError, match="never fill one optimizer update"):
        train_lora(model, tok, env["records"][:6], tmp_path / "u",
                   dataclasses.replace(cfg, grad_accum=8), progress=False)


def _lora_b(model):
    import jax

    from g2is_jax.models.lora import split_lora

    flat = jax.tree_util.tree_flatten_with_path(split_lora(model)[2])[0]
    return [(jax.tree_util.keystr(p), x) for p, x in flat if "lora_b" in jax.tree_util.keystr(p)]


# ------------------------------------------------------------------------------ select, no model


def _store(path, array, data=None, ids=None):
    meta = {"gradient": "adam", "checkpoint_lr": 1e-4,
            "record_ids": ids or [f"r{i}" for i in range(array.shape[0])]}
    if data is not None:
        meta["data_sha256"] = file_sha256(data)
    write_features(path, array, meta)
    return str(path)


def _pool_with_bom(path, n):
    rows = [json.dumps({"id": f"p{i}", "prompt": f"q{i}", "completion": f"a{i}"}) for i in
            range(n)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    return rows


def _select(t, v, out, *extra):
    return main(["select", "--train-features", t, "--val-features", v, "--out", str(out),
                 *extra])


def test_select_subset_from_a_bom_pool_and_a_json_array(tmp_path, capsys):
    """Issue 12.5 and 12.6: the subset has no stray BOM and loads back; a .json array pool that
    grads reads is read the same way by select."""
    rng = np.random.default_rng(0)
    rows = _pool_with_bom(tmp_path / "pool.jsonl", 8)
    ids = [r.id for r in load_records(tmp_path / "pool.jsonl")]
    t = _store(tmp_path / "t", rng.standard_normal((8, 6)), tmp_path / "pool.jsonl", ids)
    v = _store(tmp_path / "v", rng.standard_normal((3, 6)))
    out = tmp_path / "sel"
    assert _select(t, v, out, "--method", "random", "--ratio", "1.0", "--seed", "3",
                   "--data", str(tmp_path / "pool.jsonl")) == 0
    sel = json.loads((out / "selection.json").read_text())
    assert sorted(sel["indices"]) == list(range(8)) and sel["indices"] != list(range(8))
    got = (out / "selected.jsonl").read_bytes()
    assert b"\xef\xbb\xbf" not in got
    assert got.decode().splitlines() == [rows[i] for i in sel["indices"]]
    assert [r.id for r in load_records(out / "selected.jsonl")] == [ids[i] for i in
                                                                    sel["indices"]]
    # A JSON array pool.
    docs = [{"id": f"j{i}", "instruction": f"do {i}", "output": f"done {i}"} for i in range(8)]
    (tmp_path / "pool.json").write_text(json.dumps(docs, indent=2))
    ids = [r.id for r in load_records(tmp_path / "pool.json")]
    t2 = _store(tmp_path / "t2", rng.standard_normal((8, 6)), tmp_path / "pool.json", ids)
    assert _select(t2, v, tmp_path / "sel2", "--method", "less", "--ratio", "0.5",
                   "--data", str(tmp_path / "pool.json")) == 0, capsys.readouterr().err
    sel = json.loads((tmp_path / "sel2" / "selection.json").read_text())
    sub = load_records(tmp_path / "sel2" / "selected.jsonl")
    assert [r.id for r in sub] == [ids[i] for i in sel["indices"]] and len(sub) == 4


def test_select_folder_is_one_set(tmp_path, monkeypatch, capsys):
    """Issue 12.3 and 12.2: a reused --out never keeps a stale selected.jsonl, and a full disk
    leaves the previous set whole."""
    rng = np.random.default_rng(1)
    _pool_with_bom(tmp_path / "pool.jsonl", 10)
    ids = [r.id for r in load_records(tmp_path / "pool.jsonl")]
    t = _store(tmp_path / "t", rng.standard_normal((10, 6)), tmp_path / "pool.jsonl", ids)
    v = _store(tmp_path / "v", rng.standard_normal((3, 6)))
    out = tmp_path / "sel"
    data = ["--data", str(tmp_path / "pool.jsonl")]
    assert _select(t, v, out, "--method", "less", "--ratio", "0.3", *data) == 0
    assert sorted(p.name for p in out.iterdir()) == ["selected.jsonl", "selection.json"]
    assert _select(t, v, out, "--method", "random", "--ratio", "0.5") == 0
    assert sorted(p.name for p in out.iterdir()) == ["selection.json"]
    assert _select(t, v, out, "--method", "less", "--ratio", "0.3", *data) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert _select(t, v, out, "--method", "random", "--ratio", "0.5", *data) == 2
    monkeypatch.undo()
    assert "no space left on the device" in _err_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_feature_files_are_read_by_one_checked_reader(tmp_path, capsys):
    """Issue 12.8, 12.9, 12.11: schema-checked meta; bfloat16 readable; damaged .npy named as
    such; non-finite rows named by record id, all of them."""
    import ml_dtypes

    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    v = rng.standard_normal((3, 8)).astype(np.float32)
    # bfloat16 features select exactly as their float32 values do.
    np.save(tmp_path / "t16.npy", x.astype(ml_dtypes.bfloat16))
    np.save(tmp_path / "t32.npy", x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.save(tmp_path / "v.npy", v)
    for name in ("t16", "t32"):
        assert _select(str(tmp_path / f"{name}.npy"), str(tmp_path / "v.npy"), tmp_path / name,
                       "--method", "less", "--ratio", "0.25") == 0
    pick = [json.loads((tmp_path / n / "selection.json").read_text())["indices"]
            for n in ("t16", "t32")]
    assert pick[0] == pick[1]
    capsys.readouterr()
    # Random bytes are not "pickled data".
    (tmp_path / "rand.npy").write_bytes(rng.bytes(300))
    assert _select(str(tmp_path / "rand.npy"), str(tmp_path / "v.npy"), tmp_path / "o1") == 2
    line = _err_line(capsys)
    assert "not a .npy array file" in line and "pickle" not in line
    # A hand-edited meta.json.
    t = _store(tmp_path / "t", x)
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    (tmp_path / "t" / "meta.json").write_text(json.dumps({**meta, "n": "forty"}))
    assert _select(t, str(tmp_path / "v.npy"), tmp_path / "o2") == 2
    assert "'n' must be an integer ≥ 0, got \"forty\"" in _err_line(capsys)
    # Every non-finite row, by record id.
    y = x.copy()
    y[[2, 7, 9]] = np.nan
    bad_dir = tmp_path / "nanstore"
    bad_dir.mkdir()
    np.save(bad_dir / "features.npy", y)
    (bad_dir / "meta.json").write_text(json.dumps(
        {"n": 12, "dim": 8, "record_ids": [f"rec-{i}" for i in range(12)]}))
    assert _select(str(bad_dir), str(tmp_path / "v.npy"), tmp_path / "o3") == 2
    line = _err_line(capsys)
    assert "NaN or Inf in 3 row(s): rec-2 (row 2), rec-7 (row 7), rec-9 (row 9)" in line
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_store_messages_and_full_disk(tmp_path, monkeypatch):
    """Issue 12.11: no Python function named in hints; 12.2: a full disk during `grads` is one
    line and the store stays resumable."""
    meta = {"record_ids": [f"r{i}" for i in range(6)]}
    write_features(tmp_path / "done", np.ones((6, 4), np.float32), meta)
    with pytest.raises(G2ISError) as e:
        open_store(tmp_path / "done", meta, 6, 4)
    assert "load_features" not in str(e.value) and "--overwrite" in str(e.value)
    with open_store(tmp_path / "s", meta, 6, 4) as st:
        st.write(0, np.ones((2, 4)))

        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(G2ISError, match="no space left on the device holding .*; the rows "
                                            "committed so far are kept: re-run"):
            st.write(2, np.ones((2, 4)))
        monkeypatch.undo()
        with pytest.raises(ValueError, match="closed"):  # a re-open checks the journal
            st.write(2, np.ones((2, 4)))
    with open_store(tmp_path / "s", meta, 6, 4) as st:
        assert st.missing().tolist() == [2, 3, 4, 5]
        st.write(2, np.ones((4, 4)))
        st.finalize()


def test_deeply_nested_json_is_one_line(tmp_path):
    """Issue 12.8: a 100,000-deep line was a RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' + deep + "\n")
    with pytest.raises(G2ISError, match=r"record 1 \(line 2\): JSON nested too deeply"):
        load_records(tmp_path / "deep.jsonl")
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(G2ISError, match="nested too deeply"):
        load_records(tmp_path / "deep.json")
    (tmp_path / "blank.jsonl").write_text("\n   \n\n")
    with pytest.raises(G2ISError, match="the file holds only blank lines"):
        load_records(tmp_path / "blank.jsonl")


def test_logging_is_the_clis_own(capsys):
    """Issue 12.10: orbax's import-time basicConfig no longer swallows INFO, -v shows DEBUG, and
    orbax's "Waiting for previous save" warnings do not reach the user."""
    root = logging.getLogger()
    plain = logging.StreamHandler()  # what absl's logging.basicConfig() installs
    plain.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root.addHandler(plain)
    try:
        setup_logging(False)
        assert plain not in root.handlers
        logging.getLogger("g2is_jax.featurize").info("resuming: 3 of 9 batches already stored")
        logging.getLogger("g2is_jax.featurize").debug("hidden detail")
        logging.getLogger("absl").warning("Waiting for previous save to complete took 2 s.")
        logging.getLogger("absl").info("orbax chatter")
        logging.getLogger("absl").warning("a real warning")
        err = capsys.readouterr().err
        assert "INFO g2is_jax.featurize: resuming: 3 of 9" in err and "hidden" not in err
        assert "Waiting" not in err and "chatter" not in err and "a real warning" in err
        setup_logging(True)
        logging.getLogger("g2is_jax.featurize").debug("shown detail")
        err = capsys.readouterr().err
        assert "DEBUG g2is_jax.featurize: shown detail" in err
        assert err.count("shown detail") == 1  # one handler, not two
    finally:
        setup_logging(False)
        root.removeHandler(plain)


def test_warmup_resume_compares_model_content_not_path_text(tmp_path):
    """Issue 12.1 for `g2is warmup`: run_info held the --model text (so `dir/` was refused and
    replaced weights were not)."""
    from g2is_jax.train import _check_run_info

    info = {"train_config": TRAIN.to_json(), "record_ids": ["a"], "model": "/m/model",
            "model_fingerprint": "ab" * 32, "data": "/d/pool.jsonl", "data_sha256": "cd" * 32}
    _check_run_info(tmp_path, info)
    _check_run_info(tmp_path, {**info, "model": "/elsewhere/model/", "data": "/x/pool.jsonl"})
    with pytest.raises(G2ISError, match=r"other settings \(changed: the model's weights"):
        _check_run_info(tmp_path, {**info, "model_fingerprint": "ef" * 32})
    with pytest.raises(G2ISError, match=r"changed: the data file's content"):
        _check_run_info(tmp_path, {**info, "data_sha256": "00" * 32})
    with pytest.raises(G2ISError, match=r"the training config \(\['epochs'\]\)"):
        _check_run_info(tmp_path, {**info, "train_config": {**TRAIN.to_json(), "epochs": 9}})


def test_typed_meta_reads_back_the_document(tmp_path):
    """The schema-checked meta is also the document it was read from (same keys, order and
    nulls), so code that rewrites a store's meta (merging shards) keeps its bytes."""
    from g2is_jax.store import FeatureMeta, read_features

    meta = {"model": "m", "checkpoint_lr": None, "gradient": "sgd",
            "record_ids": ["a", "b", "c"], "zeta": {"k": [1, 2]}}
    write_features(tmp_path / "s", np.ones((3, 2), np.float32), meta)
    doc = json.loads((tmp_path / "s" / "meta.json").read_text())
    fs = read_features(tmp_path / "s")
    assert isinstance(fs.meta, FeatureMeta) and fs.meta.gradient == "sgd"
    assert fs.meta.record_ids == ("a", "b", "c") and fs.meta.extra["zeta"] == {"k": [1, 2]}
    assert dict(fs.meta) == doc and list(fs.meta) == list(doc) and fs.meta.to_json() == doc
    assert fs.meta.get("checkpoint_lr", "absent") is None and "checkpoint_epoch" not in fs.meta
