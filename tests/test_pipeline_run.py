"""`g2is run` end to end at tiny size (a random tiny model, a tiny synthetic pool): every artefact
exists and is well formed, the report's numbers are finite, a second run reuses every stage, a
changed config recomputes only what depends on the change, and an interrupted stage resumes."""

import json
import os

import numpy as np
import pytest

from g2is_jax.cli import main
from g2is_jax.errors import G2ISError
from g2is_jax.runconfig import load_run_config
from g2is_jax.testing import tiny_hf_model_dir

CONFIG = """
max_length = 128

[suite]
n_pool = 40
target = "arithmetic"
target_share = 0.25
n_dev = 4
n_test = 4

[warmup]
preset = "cpu"
fraction = 0.5
epochs = 2
lora_rank = 4
batch_size = 4
grad_accum = 1

[features]
projection = "sparse"
dim = 64
batch_size = 4
checkpoints = "all"

[select]
methods = ["g2is", "less", "random", "full"]
ratios = [0.1]
seeds = [0]

[finetune]
preset = "cpu-finetune"
epochs = 1
lora_rank = 4

[evaluate]
max_new_tokens = 4
batch_size = 4
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model_dir = tiny_hf_model_dir(root / "model")
    config = root / "run.toml"
    config.write_text(f'model = "{model_dir}"\n' + CONFIG)
    out = root / "out"
    args = ["run", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return root, config, out, args


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
            and p.name not in ("report.json", "report.md", "run_config.json")
            and "plots" not in p.parts}


def test_artefacts_exist_and_are_well_formed(run):
    _, _, out, _ = run
    for epoch in (1, 2):
        assert (out / "warmup" / "checkpoints" / str(epoch)).is_dir()
        pool = np.load(out / "features" / f"epoch-{epoch}" / "pool" / "features.npy")
        dev = np.load(out / "features" / f"epoch-{epoch}" / "dev" / "features.npy")
        assert pool.shape == (40, 64) and dev.shape == (4, 64)
        assert np.isfinite(pool).all() and np.abs(pool).sum() > 0
    for label in ("g2is-r0.1", "less-r0.1", "random-r0.1-s0"):
        sel = json.loads((out / "select" / label / "selection.json").read_text())
        assert len(sel["indices"]) == 4 == len(set(sel["indices"]))
        assert all(0 <= i < 40 for i in sel["indices"])
        lines = (out / "select" / label / "selected.jsonl").read_text().splitlines()
        assert [json.loads(x)["id"] for x in lines] == sel["record_ids"]
    for label in ("g2is-r0.1-s0", "less-r0.1-s0", "random-r0.1-s0", "full-s0"):
        assert (out / "finetune" / label / "checkpoints" / "1").is_dir()
        assert (out / "finetune" / label / "peft" / "adapter_config.json").is_file()
        ev = json.loads((out / "eval" / f"{label}.json").read_text())
        assert len(ev["loss"]) == 4 and len(ev["predictions"]) == 4
        assert set(ev["exact_match"]) <= {0, 1}


def test_report_numbers_are_finite(run):
    _, _, out, _ = run
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert [r["method"] for r in rows] == ["base", "g2is", "less", "random", "full"]
    for r in rows:
        assert np.isfinite(r["mean_loss"]) and 0.0 <= r["exact_match"] <= 1.0
    assert [r["n_train"] for r in rows] == [0, 4, 4, 4, 40]
    summary = {(e["method"], e["ratio"]): e for e in report["summary"]}
    assert summary["g2is", 0.1]["seeds"] == 1 and summary["g2is", 0.1]["n_train"] == 4
    q = report["selection_quality"]
    assert set(q) == {"g2is-r0.1", "less-r0.1", "random-r0.1-s0"}
    pool = [json.loads(x) for x in (out / "data" / "pool.jsonl").read_text().splitlines()]
    for label, v in q.items():
        sel = json.loads((out / "select" / label / "selection.json").read_text())["indices"]
        clean = sum(pool[i]["domain"] == "arithmetic" and pool[i]["kind"] == "clean"
                    for i in sel)
        assert v["n"] == 4 and v["target_clean"] == clean and v["precision"] == clean / 4
        assert v["target_clean"] + v["target_conflict"] == v["target"]
    for rel in report["figures"].values():
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"mean_loss", "exact_match", "walk g2is-r0.1", "budgets g2is-r0.1"} <= set(
        report["figures"])
    md = (out / "report.md").read_text()
    assert "| g2is | 0.1 | 4 | 1 |" in md and "plots/walk_g2is-r0.1.png" in md


def test_second_run_reuses_every_stage(run, capsys):
    _, _, out, args = run
    before = _mtimes(out)
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"] and all(s["cached"] for s in report["stages"])
    assert _mtimes(out) == before
    assert "cached" in capsys.readouterr().out


def test_added_seed_recomputes_only_what_depends_on_it(run):
    _, _, out, args = run
    before = _mtimes(out)
    assert main([*args, "--methods", "random", "--seeds", "0,1"]) == 0
    report = json.loads((out / "report.json").read_text())
    fresh = {s["name"] for s in report["stages"] if not s["cached"]}
    assert fresh == {"select: random-r0.1-s1", "finetune: random-r0.1-s1 (4 records)",
                     "evaluate: random-r0.1-s1"}
    after = _mtimes(out)
    assert all(after[p] == t for p, t in before.items())
    summary = {(e["method"], e["ratio"]): e for e in report["summary"]}
    assert summary["random", 0.1]["seeds"] == 2
    assert np.isfinite(summary["random", 0.1]["mean_loss_std"])
    r0 = json.loads((out / "select" / "random-r0.1-s0" / "selection.json").read_text())
    r1 = json.loads((out / "select" / "random-r0.1-s1" / "selection.json").read_text())
    assert r0["indices"] != r1["indices"]  # the seed reaches the random selection


def test_interrupted_stage_resumes_and_keeps_what_was_done(run):
    _, _, out, args = run
    # Fake a crash of one fine-tune after its checkpoint was written, before its PEFT export.
    ft = out / "finetune" / "less-r0.1-s0"
    marker = json.loads((ft / "stage.json").read_text())
    (ft / "stage.json").write_text(json.dumps({**marker, "status": "running"}))
    import shutil

    shutil.rmtree(ft / "peft")
    ckpt = (ft / "checkpoints" / "1" / "state").stat().st_mtime_ns
    evals = (out / "eval" / "less-r0.1-s0.json").read_bytes()
    assert main(args) == 0
    assert (ft / "peft" / "adapter_config.json").is_file()
    assert (ft / "checkpoints" / "1" / "state").stat().st_mtime_ns == ckpt  # not retrained
    assert json.loads((ft / "stage.json").read_text())["status"] == "done"
    assert (out / "eval" / "less-r0.1-s0.json").read_bytes() == evals
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"] if not s["cached"]] == [
        "finetune: less-r0.1-s0 (4 records)"]


def test_changed_settings_recompute_the_stage_and_what_follows(run, capsys):
    _, _, out, args = run
    before = _mtimes(out)
    assert main([*args, "--set", "evaluate.max_new_tokens=2"]) == 0
    assert "inputs changed, recomputing" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    fresh = sorted(s["name"] for s in report["stages"] if not s["cached"])
    assert fresh == ["evaluate: base model", "evaluate: full-s0", "evaluate: g2is-r0.1-s0",
                     "evaluate: less-r0.1-s0", "evaluate: random-r0.1-s0"]
    after = _mtimes(out)
    changed = {p for p, t in before.items() if after.get(p) != t}
    assert changed and all(p.parent.name == "eval" for p in changed)
    assert json.loads((out / "eval" / "base.stage.json").read_text())["inputs"]["evaluate"][
        "max_new_tokens"] == 2


def test_pool_mean_remove_reselects_only_the_walk_and_is_recorded(run):
    _, _, out, args = run
    keep = json.loads((out / "select" / "g2is-r0.1" / "selection.json").read_text())
    assert keep["conventions"]["pool_mean"] == "keep" and "pool_mean" not in keep["config"]
    assert main([*args, "--pool-mean", "remove"]) == 0
    report = json.loads((out / "report.json").read_text())
    fresh = {s["name"] for s in report["stages"] if not s["cached"]}
    assert {n for n in fresh if n.startswith("select:")} == {"select: g2is-r0.1"}
    doc = json.loads((out / "select" / "g2is-r0.1" / "selection.json").read_text())
    assert doc["conventions"]["pool_mean"] == "remove" and doc["config"]["pool_mean"] == "remove"
    assert 0 < doc["conventions"]["removed_energy"] <= 1
    assert report["config"]["select"]["pool_mean"] == "remove"
    assert "pool_mean remove" in (out / "report.md").read_text()


def test_yaml_config_equals_toml(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('[suite]\nn_pool = 50\n[select]\nratios = [0.01, 0.05]\n'
                    '[data]\n')
    yaml_ = tmp_path / "a.yaml"
    yaml_.write_text("suite:\n  n_pool: 50\nselect:\n  ratios: [0.01, 0.05]\ndata: {}\n")
    assert load_run_config(toml) == load_run_config(yaml_)
    cfg = load_run_config(toml, ["select.seeds=3,4", "warmup.epochs=2"])
    assert cfg.select.seeds == (3, 4) and cfg.warmup.epochs == 2
    assert cfg.select.ratios == (0.01, 0.05) and cfg.suite.n_pool == 50


@pytest.mark.parametrize("text,match", [
    ("[suite]\nn_pol = 3\n", r"unknown key\(s\) \['n_pol'\] in \[suite\]"),
    ("[suite]\n[select]\nmethods = ['g2is', 'best']\n", "unknown methods"),
    ("[suite]\n[select]\nratios = [1.5]\n", r"ratios must be in \(0, 1\]"),
    ("[suite]\n[warmup]\nepochs = 'two'\n", "warmup.epochs: expected int"),
    ("max_length = 128\n", "the run needs data"),
    ("[suite]\n[data]\npool = 'p.jsonl'\n", "either \\[suite\\] or \\[data\\]"),
    ("[suite\n", "not valid TOML"),
])
def test_bad_configs_are_refused_clearly(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(G2ISError, match=match):
        load_run_config(path)


def test_bad_config_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[suite]\nn_pol = 3\n")
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "n_pol" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_data_paths_resolve_against_the_config_file(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    path = sub / "run.yaml"
    path.write_text("data:\n  pool: p.jsonl\n  dev: ../d.jsonl\n  test: t.jsonl\n")
    cfg = load_run_config(path)
    assert cfg.data.pool == str(sub / "p.jsonl") and cfg.data.dev == str(tmp_path / "d.jsonl")
    assert os.path.isabs(load_run_config(path, ["data.test=x.jsonl"]).data.test)


def test_example_config_is_the_demo_with_more_methods():
    import dataclasses
    from pathlib import Path

    from g2is_jax.demo import demo_config

    path = Path(__file__).resolve().parent.parent / "examples" / "suite.toml"
    cfg = load_run_config(path)
    demo = demo_config()
    assert cfg.select.methods == ("g2is", "less", "random", "full")
    assert dataclasses.replace(cfg, select=demo.select) == demo
