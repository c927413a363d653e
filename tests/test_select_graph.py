"""The blocked kNN graph against brute force; saving, loading, the mixed graph, graph-mode use."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from g2is_jax.errors import G2ISError
from g2is_jax.select import KnnGraph, g2is_select, knn_graph, mixed_graph, prepare_rows
from g2is_jax.select.graph import neighbor_indices


def brute_force(unit: np.ndarray, k: int):
    # Exactly rounded dots (math.fsum): a BLAS matmul may sum identical rows in different orders
    # (seen with numpy 2.4's OpenBLAS), which would break the index order of exact ties.
    sims = np.array([[math.fsum(a * b) for b in unit] for a in unit])
    order = np.lexsort((np.broadcast_to(np.arange(len(unit)), sims.shape), -sims), axis=1)
    top = order[:, :k]
    return top, np.take_along_axis(sims, top, axis=1)


def _pool(seed, n_rows, dim):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n_rows, dim))
    t[rng.integers(0, n_rows, n_rows // 5)] = t[rng.integers(0, n_rows, n_rows // 5)]  # copies
    t[rng.integers(0, n_rows, 5)] = 0.0  # zero rows: similarity 0 with everything
    return t


@pytest.mark.parametrize("n_rows, k, block_rows", [(300, 7, 64), (130, 130, 32), (5, 9, 512)])
def test_blocked_graph_matches_brute_force(n_rows, k, block_rows):
    t = _pool(n_rows, n_rows, 6)
    with jax.enable_x64(True):
        unit, _ = prepare_rows(t)
        # key_block 128 < N forces several key blocks; block_rows < N several query blocks.
        g = knn_graph(unit, k, n_rows=n_rows, block_rows=block_rows, key_block=128)
    want_idx, want_sim = brute_force(np.asarray(unit)[:n_rows], min(k, n_rows))
    np.testing.assert_array_equal(g.indices, want_idx)
    np.testing.assert_allclose(g.similarities, want_sim, atol=1e-12)
    assert g.k == min(k, n_rows)


def test_graph_lists_start_with_the_row_or_an_equal_copy():
    t = _pool(1, 200, 5)
    unit, _ = prepare_rows(t.astype(np.float32))
    g = knn_graph(unit, 4, n_rows=200)
    nonzero = np.linalg.norm(t, axis=1) > 0
    first = g.indices[:, 0]
    same = np.all(t[first] == t, axis=1)  # the row itself or an identical copy (lower index)
    assert np.all(same[nonzero])
    assert np.all(first[nonzero] <= np.arange(200)[nonzero])


def test_save_load_roundtrip(tmp_path):
    unit, _ = prepare_rows(_pool(2, 50, 4).astype(np.float32))
    g = knn_graph(unit, 5, n_rows=50)
    path = g.save(tmp_path / "g.npz")
    back = KnnGraph.load(path)
    np.testing.assert_array_equal(back.indices, g.indices)
    np.testing.assert_array_equal(back.similarities, g.similarities)
    assert (back.n_train, back.n_val, back.k) == (50, 0, 5)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(G2ISError, match="rebuild"):
        KnnGraph.load(tmp_path / "junk.npz")
    with pytest.raises(G2ISError, match="not found"):
        KnnGraph.load(tmp_path / "missing.npz")


def test_mixed_graph_has_validation_nodes():
    rng = np.random.default_rng(3)
    t, v = rng.standard_normal((60, 4)), rng.standard_normal((6, 4))
    unit, _ = prepare_rows(t.astype(np.float32))
    v_unit, _ = prepare_rows(v.astype(np.float32))
    g = mixed_graph(unit, v_unit[:6], 8, n_train=60)
    assert g.indices.shape == (66, 8) and (g.n_train, g.n_val) == (60, 6)
    assert g.indices.max() >= 60  # some neighbour lists reach the validation nodes
    np.testing.assert_array_equal(g.indices[60:, 0], np.arange(60, 66))  # itself first
    with pytest.raises(G2ISError, match="mixed graph"):
        neighbor_indices(g, 60)


def test_prebuilt_graph_gives_the_same_selection_as_on_the_fly():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((5, 8))
    t = centres[rng.integers(0, 5, 400)] + 0.4 * rng.standard_normal((400, 8))
    v = centres[:3] + 0.4 * rng.standard_normal((3, 8))
    with jax.enable_x64(True):
        unit, _ = prepare_rows(t)
        g = knn_graph(unit, 10, n_rows=400)
        a = g2is_select(t, v, ratio=0.1, neighbors=10, mode="graph", graph=g)
        b = g2is_select(t, v, ratio=0.1, neighbors=10)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert len(a.indices) == 40
    with pytest.raises(G2ISError, match="fewer than neighbors=20"):
        g2is_select(t, v, ratio=0.1, neighbors=20, mode="graph", graph=g)
    with pytest.raises(G2ISError, match="rows but the pool has"):
        g2is_select(t[:300], v, ratio=0.1, neighbors=10, mode="graph", graph=g)
