"""`g2is run` with several targets and both pool settings (tiny random model, synthetic data):
every scope is selected, fine-tuned and evaluated; the report compares each walk method with
less and random per target, with intervals and verdicts; identical selections share one
fine-tune; each feature file is opened once."""

import json

import numpy as np
import pytest

from g2is_jax.data import build_pool, build_target, write_jsonl
from g2is_jax.errors import G2ISError
from g2is_jax.models.config import ModelConfig
from g2is_jax.models.llama import init_model
from g2is_jax.models.loading import save_hf_checkpoint
from g2is_jax.pipeline import _Features, run_pipeline
from g2is_jax.runconfig import config_from_mapping, load_run_config
from g2is_jax.testing import tiny_tokenizer

TARGETS = ("arithmetic", "boolean")


def _config(root, model_dir):
    # The general pool holds no target-domain records (the paper's general-pool setting).
    pool = build_pool(30, seed=0, domains=("word_sorting", "list_ops", "unit_conversion"))
    write_jsonl(pool, root / "pool.jsonl")
    targets = []
    for i, name in enumerate(TARGETS):
        dev, test = build_target(name, n_dev=3, n_test=4, seed=10 + i)
        own, _ = build_target(name, n_dev=6, n_test=1, seed=20 + i)
        for part, recs in (("dev", dev), ("test", test), ("train", own)):
            write_jsonl(recs, root / f"{name}.{part}.jsonl")
        targets.append({"name": name, "dev": str(root / f"{name}.dev.jsonl"),
                        "test": str(root / f"{name}.test.jsonl"),
                        "train": str(root / f"{name}.train.jsonl"),
                        "max_new_tokens": 2 + i})
    return {
        "model": str(model_dir), "max_length": 128, "data": {"pool": str(root / "pool.jsonl")},
        "targets": targets,
        "warmup": {"preset": "cpu", "fraction": 0.5, "epochs": 1, "lora_rank": 4,
                   "batch_size": 4, "grad_accum": 1},
        "features": {"projection": "sparse", "dim": 32, "batch_size": 4},
        "select": {"methods": ["g2is", "less", "random"], "ratios": [0.1],
                   "seeds": [0, 1], "pools": ["general", "with-target"]},
        "finetune": {"preset": "cpu-finetune", "epochs": 1, "lora_rank": 4, "batch_size": 4},
        "evaluate": {"max_new_tokens": 4, "batch_size": 4},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("targets")
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, eos_token_id=tok.eos_token_id)
    model_dir = save_hf_checkpoint(init_model(cfg, seed=0), tok, root / "model")
    loads = []
    original = _Features.get

    def counting(self, path, role):
        loads.append(path)
        return original(self, path, role)

    monkeypatch_module.setattr(_Features, "get", counting)
    opened = []
    from g2is_jax.select import features as feats

    real_load = feats.load_features
    monkeypatch_module.setattr(feats, "load_features",
                               lambda p, **kw: opened.append(p) or real_load(p, **kw))
    cfg = config_from_mapping(_config(root, model_dir))
    report = run_pipeline(cfg, root / "out", progress=False, echo=False)
    return root / "out", report, opened


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_scope_is_selected_trained_and_evaluated(run):
    out, report, _ = run
    for name in TARGETS:
        assert (out / "eval" / name / "base.json").is_file()
        for pool, n_pool in (("general", 30), ("with-target", 36)):
            sel = json.loads((out / "select" / name / pool / "g2is-r0.1" / "selection.json")
                             .read_text())
            assert 1 <= len(sel["indices"]) <= sel["budget"] == 3  # a walk may end short
            assert max(sel["indices"]) < n_pool
            assert sel["conventions"]["pca_sign"] == "v-based"
            assert sel["config"]["pool_setting"] == pool
            assert set(sel["diagnostics"]) >= {"pool", "selection", "walk", "verdict"}
    rows = [r for r in report["results"] if r["method"] != "base"]
    assert len(rows) == 2 * 2 * 3 * 2
    for r in rows:
        assert np.isfinite(r["mean_loss"]) and 0 <= r["exact_match"] <= 1
    # with-target pools can hold the target's own records; the general pool cannot.
    for label, q in report["selection_quality"].items():
        if "/general/" in label:
            assert q["target"] == 0, label


def test_comparisons_and_verdicts(run):
    out, report, _ = run
    comps = report["comparisons"]
    keys = {(c["target"], c["pool"], c["method"], c["against"]) for c in comps}
    assert keys == {(t, p, m, ref) for t in TARGETS for p in ("general", "with-target")
                    for m in ("g2is",) for ref in ("less", "random")}
    for c in comps:
        assert c["seeds"] == [0, 1]
        for m in ("mean_loss", "exact_match"):
            ci = c[m]
            assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["records"] == 4
            assert ci["verdict"] in ("better", "worse", "not distinguishable")
    md = (out / "report.md").read_text()
    assert "g2is vs less: test loss" in md and "Paired differences" in md
    assert "Diagnostics" in md


def test_identical_sets_share_a_fine_tune(run):
    """Rows of one scope and seed whose selections hold the same set point to one fine-tune."""
    out, report, _ = run
    sets = {}
    for name in TARGETS:
        for pool in ("general", "with-target"):
            for label in ("g2is-r0.1", "less-r0.1", "random-r0.1-s0", "random-r0.1-s1"):
                doc = json.loads((out / "select" / name / pool / label / "selection.json")
                                 .read_text())
                sets[name, pool, label] = frozenset(doc["indices"])
    rows = [r for r in report["results"] if r["method"] != "base"]
    for r in rows:
        label = f"{r['method']}-r0.1" + (f"-s{r['seed']}" if r["method"] == "random" else "")
        mine = sets[r["target"], r["pool"], label]
        earlier = [q for q in rows[: rows.index(r)] if (q["target"], q["pool"], q["seed"]) ==
                   (r["target"], r["pool"], r["seed"]) and not q.get("same_as")]
        twins = [q for q in earlier if sets[q["target"], q["pool"], f"{q['method']}-r0.1" + (
            f"-s{q['seed']}" if q["method"] == "random" else "")] == mine]
        assert bool(r.get("same_as")) == bool(twins), r
        if twins:
            assert r["mean_loss"] == twins[0]["mean_loss"]


def test_fine_tune_key_depends_on_the_set_not_its_order():
    from g2is_jax.pipeline import finetune_key

    a = finetune_key("x/general/", {"p": 1}, [5, 2, 9], {"seed": 0})
    assert a == finetune_key("x/general/", {"p": 1}, [9, 5, 2], {"seed": 0})
    assert a != finetune_key("x/general/", {"p": 1}, [9, 5, 3], {"seed": 0})
    assert a != finetune_key("x/general/", {"p": 1}, [9, 5, 2], {"seed": 1})
    assert a != finetune_key("y/general/", {"p": 1}, [9, 5, 2], {"seed": 0})


def test_each_feature_file_is_opened_once(run):
    _, _, opened = run
    assert len(opened) == len(set(opened)) > 0


def test_target_configs_are_checked(tmp_path):
    with pytest.raises(G2ISError, match="with-target"):
        config_from_mapping({"data": {"pool": "p.jsonl"},
                             "targets": [{"name": "a", "dev": "d", "test": "t"}],
                             "select": {"pools": ["with-target"]}})
    with pytest.raises(G2ISError, match="distinct"):
        config_from_mapping({"data": {"pool": "p.jsonl"},
                             "targets": [{"name": "a", "dev": "d", "test": "t"},
                                         {"name": "a", "dev": "d", "test": "t"}]})
    with pytest.raises(G2ISError, match="select.pca_sign"):
        config_from_mapping({"suite": {}, "select": {"pca_sign": "w-based"}})
    path = tmp_path / "cfg" / "run.toml"
    path.parent.mkdir()
    path.write_text('[data]\npool = "p.jsonl"\n[[targets]]\nname = "x"\ndev = "x.dev.jsonl"\n'
                    'test = "../x.test.jsonl"\n')
    cfg = load_run_config(path)
    assert cfg.targets[0].dev == str(path.parent / "x.dev.jsonl")
    assert cfg.targets[0].test == str(tmp_path / "x.test.jsonl")


def test_run_selects_on_a_mesh_like_select(tmp_path):
    """`g2is run` takes select.mesh as `g2is select` takes --mesh: the same selection."""
    from g2is_jax.pipeline import _Pipeline
    from g2is_jax.select import SelectionInputs, SelectOptions, run_method

    cfg = config_from_mapping({"suite": {}, "select": {"mesh": "data=4"}})
    mesh = _Pipeline(cfg, tmp_path, progress=False, echo=False)._mesh()
    assert mesh is not None and mesh.size == 4
    rng = np.random.default_rng(3)
    t, v = rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((4, 16))
    opts = SelectOptions(ratio=0.05, diagnostics=False)
    on_mesh = run_method("g2is", SelectionInputs([t], [v], mesh=mesh), opts)
    alone = run_method("g2is", SelectionInputs([t], [v]), opts)
    assert on_mesh.indices.tolist() == alone.indices.tolist() and len(alone.indices) == 15


def test_read_only_runner_reuses_and_never_recomputes(tmp_path):
    from g2is_jax.pipeline import Runner

    calls = []
    Runner(tmp_path).stage("a", tmp_path / "a", {"x": 1}, lambda d: calls.append(d))
    ro = Runner(tmp_path, read_only=True)
    assert ro.stage("a", tmp_path / "a", {"x": 1}, lambda d: calls.append(d)).cached
    with pytest.raises(G2ISError, match="made from other inputs"):
        ro.stage("a", tmp_path / "a", {"x": 2}, lambda d: calls.append(d))
    with pytest.raises(G2ISError, match="missing"):
        ro.stage("b", tmp_path / "b", {"x": 1}, lambda d: calls.append(d))
    assert len(calls) == 1 and (tmp_path / "a" / "stage.json").is_file()
    assert not (tmp_path / "b").exists()


def test_dropping_a_pool_setting_reuses_every_stage_of_the_other(run, tmp_path):
    """A run of the general pool alone, read-only over the two-setting run's folder: every stage
    it needs is already there (before, the general pool's fine-tunes were fingerprinted with the
    target's training file only when "with-target" was also asked for, so they recomputed)."""
    from g2is_jax.pipeline import report_finished

    out, report, _ = run
    doc = json.loads((out / "run_config.json").read_text())
    doc["select"]["pools"] = ["general"]
    before_files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = report_finished(config_from_mapping(doc), out, tmp_path / "general")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before_files
    assert (tmp_path / "general" / "report.md").is_file()
    rows = [e for e in again["summary"] if e["method"] != "base"]
    assert rows and {e["pool"] for e in rows} == {"general"}
    before = {(e["target"], e["method"]): e["mean_loss"] for e in report["summary"]
              if e.get("pool") == "general"}
    assert {(e["target"], e["method"]): e["mean_loss"] for e in rows} == before


def test_a_stopped_run_cannot_be_reported_as_finished(run, tmp_path):
    from g2is_jax.pipeline import report_finished

    out, _, _ = run
    doc = json.loads((out / "run_config.json").read_text())
    doc["select"]["seeds"] = [0, 1, 2]  # seed 2 was never run
    with pytest.raises(G2ISError, match="is missing"):
        report_finished(config_from_mapping(doc), out, tmp_path / "r")
