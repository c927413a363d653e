"""`pool_mean`: the pool's mean feature direction projected out before the walk (this project's
option; default "keep", the authors' features). Tested under each choice: the projection against
a NumPy reference, the host edge against an in-memory computation, the registry's methods with
and without it, the sign-free property of g2is-robust under it, and the CLI's record of it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2is_jax import cli
from g2is_jax.errors import G2ISError
from g2is_jax.select import diagnostics, features
from g2is_jax.select.methods import SelectionInputs, SelectOptions, method_config, run_method


def shared_pool(n=300, d=48, shared=4.0, seed=0):
    """Rows = a common direction (weight `shared`) plus isotropic noise: after a short warm-up
    LESS's Adam features look like this (every pair of rows at a positive cosine)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(d)
    c /= np.linalg.norm(c)
    t = shared * c + rng.standard_normal((n, d)) / np.sqrt(d)
    v = rng.standard_normal((5, d))
    return t.astype(np.float32), v.astype(np.float32), c


def numpy_remove(t):
    t = np.asarray(t, np.float64)
    unit = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-10)
    m = unit.mean(0)
    m /= np.linalg.norm(m)
    return t - np.outer(t @ m, m), float(np.mean((unit @ m) ** 2))


def test_project_out_matches_numpy_and_leaves_rows_orthogonal():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    m = rng.standard_normal(5)
    m /= np.linalg.norm(m)
    got = np.asarray(features.project_out(x, m))
    want = x - np.outer(x.astype(np.float64) @ m, m)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got @ m, 0.0, atol=1e-5)
    assert got.dtype == np.float32
    # projecting twice is projecting once
    np.testing.assert_allclose(np.asarray(features.project_out(got, m)), got, atol=1e-6)


def test_project_out_composes_under_jit_and_vmap():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    ms = rng.standard_normal((3, 4))
    ms /= np.linalg.norm(ms, axis=1, keepdims=True)
    batched = jax.jit(jax.vmap(features.project_out, in_axes=(None, 0)))(x, jnp.asarray(ms))
    for i, m in enumerate(ms):
        np.testing.assert_allclose(np.asarray(batched[i]),
                                   np.asarray(features.project_out(x, m)), atol=1e-6)


def test_remove_mean_direction_matches_in_memory_reference_in_chunks(monkeypatch):
    t, _, _ = shared_pool(n=250)
    monkeypatch.setattr(features, "_CHECK_ROWS", 64)  # several chunks, the last one short
    got, info = features.remove_mean_direction(t)
    want, energy = numpy_remove(t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert info["pool_mean"] == "remove"
    assert info["removed_energy"] == pytest.approx(energy, abs=1e-5)
    # the recorded energy is the one the pool diagnostics report for the features as computed
    assert info["removed_energy"] == pytest.approx(
        diagnostics.pool_diagnostics(t)["mean_direction_energy"], abs=1e-6)


def test_removing_the_shared_direction_lets_pairs_conflict():
    t, _, _ = shared_pool()
    before = diagnostics.pool_diagnostics(t)
    after = diagnostics.pool_diagnostics(features.remove_mean_direction(t)[0])
    assert before["negative_pair_fraction"] == 0.0 and before["mean_direction_energy"] > 0.9
    assert 0.4 < after["negative_pair_fraction"] < 0.6
    assert after["mean_direction_energy"] < 0.1


def test_zero_mean_pool_is_left_unchanged():
    t = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], np.float32)
    got, info = features.remove_mean_direction(t)
    np.testing.assert_array_equal(got, t)
    assert info == {"pool_mean": "remove", "removed_energy": 0.0}


def test_walk_with_pool_mean_remove_is_the_walk_on_projected_features():
    t, v, _ = shared_pool()
    opts = SelectOptions(ratio=0.05, pool_mean="remove")
    got = run_method("g2is", SelectionInputs([t], [v]), opts)
    projected = features.remove_mean_direction(t)[0]
    want = run_method("g2is", SelectionInputs([projected], [v]), SelectOptions(ratio=0.05))
    np.testing.assert_array_equal(got.indices, want.indices)
    assert got.conventions["pool_mean"] == "remove"
    assert got.conventions["removed_energy"] > 0.9
    keep = run_method("g2is", SelectionInputs([t], [v]), SelectOptions(ratio=0.05))
    assert keep.conventions["pool_mean"] == "keep"
    assert not np.array_equal(keep.indices, got.indices)


def test_no_conflict_rule_acts_only_once_the_shared_direction_is_removed():
    t, v, _ = shared_pool()
    rejected = {}
    for choice in ("keep", "remove"):
        res = run_method("g2is", SelectionInputs([t], [v]),
                         SelectOptions(ratio=0.05, pool_mean=choice))
        rejected[choice] = sum(c.conflict_rejected for c in res.per_component)
        assert len(res.indices) == 15 and len(set(res.indices.tolist())) == 15
    assert rejected["keep"] == 0
    assert rejected["remove"] > 0


@pytest.mark.parametrize("method", ["g2is-robust", "g2is-abs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_free_methods_stay_sign_free_with_pool_mean_removed(method, seed):
    t, v, _ = shared_pool(seed=seed)
    runs = [run_method(method, SelectionInputs([t], [v]),
                       SelectOptions(ratio=0.05, pool_mean="remove", pca_sign=sign))
            for sign in ("v-based", "u-based")]
    np.testing.assert_array_equal(runs[0].indices, runs[1].indices)


def test_less_ignores_pool_mean_and_does_not_record_it():
    t, v, _ = shared_pool()
    a = run_method("less", SelectionInputs([t], [v]), SelectOptions(ratio=0.05))
    b = run_method("less", SelectionInputs([t], [v]),
                   SelectOptions(ratio=0.05, pool_mean="remove"))
    np.testing.assert_array_equal(a.indices, b.indices)
    assert "pool_mean" not in method_config("less", SelectOptions(pool_mean="remove"))


def test_method_config_names_pool_mean_only_when_it_is_not_the_default():
    # earlier run folders hashed the config without the option: their stages stay cached
    assert "pool_mean" not in method_config("g2is", SelectOptions())
    assert method_config("g2is", SelectOptions(pool_mean="remove"))["pool_mean"] == "remove"


def test_bad_pool_mean_names_the_parameter():
    with pytest.raises(G2ISError, match="pool_mean") as info:
        SelectOptions(pool_mean="centre")
    assert info.value.param == "pool_mean"


@pytest.fixture()
def stores(tmp_path):
    t, v, _ = shared_pool(n=200)
    (tmp_path / "train").mkdir()
    np.save(tmp_path / "train" / "features.npy", t)
    (tmp_path / "train" / "meta.json").write_text(json.dumps(
        {"n": 200, "dim": t.shape[1], "gradient": "adam",
         "record_ids": [f"id{i}" for i in range(200)]}))
    np.save(tmp_path / "val.npy", v)
    return tmp_path


def _select(tmp, out, *extra):
    return cli.main(["select", "--train-features", str(tmp / "train"), "--val-features",
                     str(tmp / "val.npy"), "--ratio", "0.05", "--out", str(tmp / out), *extra])


def test_cli_select_records_pool_mean_under_each_choice(stores, monkeypatch):
    monkeypatch.setattr(cli, "_COMMANDS", ("graph", "select"))
    assert _select(stores, "keep") == 0
    assert _select(stores, "remove", "--pool-mean", "remove") == 0
    keep = json.loads((stores / "keep" / "selection.json").read_text())
    remove = json.loads((stores / "remove" / "selection.json").read_text())
    assert keep["conventions"]["pool_mean"] == "keep"
    assert remove["conventions"]["pool_mean"] == "remove"
    assert remove["config"]["pool_mean"] == "remove"
    assert keep["indices"] != remove["indices"]


def test_cli_graph_mode_needs_a_graph_built_with_the_same_pool_mean(stores, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(cli, "_COMMANDS", ("graph", "select"))
    graph = stores / "graph.npz"
    assert cli.main(["graph", "--train-features", str(stores / "train"), "--pool-mean",
                     "remove", "--out", str(graph)]) == 0
    assert _select(stores, "g", "--mode", "graph", "--graph", str(graph), "--pool-mean",
                   "remove") == 0
    onthefly = _select(stores, "o", "--pool-mean", "remove")
    assert onthefly == 0
    assert (json.loads((stores / "g" / "selection.json").read_text())["indices"]
            == json.loads((stores / "o" / "selection.json").read_text())["indices"])
    capsys.readouterr()
    assert _select(stores, "k", "--mode", "graph", "--graph", str(graph)) == 2
    assert "built from other features" in capsys.readouterr().err
    assert not (stores / "k").exists()
