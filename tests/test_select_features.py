"""Feature files: loading and checks, checkpoint weights and combination, subtasks, JSONL lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from g2is_jax.errors import G2ISError
from g2is_jax.select import features as F


def write_store(path, array, **meta):
    path.mkdir(parents=True)
    np.save(path / "features.npy", array)
    full = {
        "n": array.shape[0],
        "dim": array.shape[1],
        "gradient": "adam",
        "record_ids": [f"r{i}" for i in range(array.shape[0])],
        "checkpoint_lr": None,
    }
    full.update(meta)
    (path / "meta.json").write_text(json.dumps(full))
    return path


def test_load_store_and_npy(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    store = write_store(tmp_path / "s", x, checkpoint_lr=1e-5)
    f = F.load_features(store)
    np.testing.assert_array_equal(f.array, x)
    assert f.record_ids == ["r0", "r1", "r2", "r3"] and f.meta["checkpoint_lr"] == 1e-5
    np.save(tmp_path / "v.npy", x[:2])
    assert F.load_features(tmp_path / "v.npy").n == 2


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: write_store(p, np.zeros((4, 3), np.float32), n=5), "n=5"),
        (lambda p: write_store(p, np.zeros((4, 3), np.float32), dim=8), "dim=8"),
        (lambda p: write_store(p, np.zeros((4, 3), np.float32), record_ids=["a"]), "record_ids"),
        (lambda p: write_store(p, np.array([[0, 1.0], [np.inf, 0]], np.float32)), "row 1"),
        (lambda p: write_store(p, np.zeros((3, 2), np.int64)), "floating"),
        (lambda p: write_store(p, np.zeros((0, 2), np.float32)), "no rows"),
        (lambda p: p.mkdir(), "no features.npy"),
        (lambda p: None, "not found"),
    ],
)
def test_bad_feature_files(tmp_path, setup, match):
    path = tmp_path / "store"
    setup(path)
    with pytest.raises(G2ISError, match=match):
        F.load_features(path)


def test_checkpoint_sets_must_agree(tmp_path):
    a = write_store(tmp_path / "a", np.ones((4, 3), np.float32))
    b = write_store(tmp_path / "b", np.ones((5, 3), np.float32))
    with pytest.raises(G2ISError, match="same rows"):
        F.load_checkpoints([a, b], role="train")
    v = write_store(tmp_path / "v", np.ones((2, 4), np.float32))
    with pytest.raises(G2ISError, match="dimensions disagree"):
        F.check_pairing(F.load_checkpoints([a], role="train"), F.load_checkpoints([v], role="v"))
    with pytest.raises(G2ISError, match="one of each"):
        F.check_pairing(F.load_checkpoints([a, a], role="train"), F.load_checkpoints([v], role="v"))


def test_weights_from_learning_rates(tmp_path):
    sets = [
        F.load_features(
            write_store(tmp_path / f"c{i}", np.ones((2, 2), np.float32), checkpoint_lr=lr)
        )
        for i, lr in enumerate([3e-5, 1e-5])
    ]
    np.testing.assert_allclose(F.checkpoint_weights(sets), [0.75, 0.25])
    unknown = [F.load_features(write_store(tmp_path / "u", np.ones((2, 2), np.float32))), sets[0]]
    np.testing.assert_allclose(F.checkpoint_weights(unknown), [0.5, 0.5])


def test_combined_dot_is_weighted_cosine_sum():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 5)), rng.standard_normal((20, 7))
    w = np.array([0.7, 0.3])
    comb = F.combine_checkpoints([a, b], w).astype(np.float64)

    def cos(x):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return u @ u.T

    np.testing.assert_allclose(comb @ comb.T, 0.7 * cos(a) + 0.3 * cos(b), atol=1e-6)
    assert F.combine_checkpoints([a], [1.0]) is a  # one checkpoint: unchanged


def test_subtasks_json_and_text(tmp_path):
    (tmp_path / "s.json").write_text('["a", "b", "a"]')
    (tmp_path / "s.txt").write_text("a\nb\n\na\n")
    assert F.load_subtasks(tmp_path / "s.json", 3) == ["a", "b", "a"]
    assert F.load_subtasks(tmp_path / "s.txt", 3) == ["a", "b", "a"]
    with pytest.raises(G2ISError, match="one per row"):
        F.load_subtasks(tmp_path / "s.txt", 4)
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(G2ISError, match="list of strings"):
        F.load_subtasks(tmp_path / "bad.json", 1)


def test_jsonl_lines_are_copied_byte_for_byte(tmp_path):
    raw = b'{"a": 1}\n{"b": "\xc3\xa9"}\r\n\n{"c": [1,  2]}'  # CRLF, a blank line, no final \n
    (tmp_path / "pool.jsonl").write_bytes(raw)
    lines = F.read_jsonl_lines(tmp_path / "pool.jsonl")
    assert lines == [b'{"a": 1}\n', b'{"b": "\xc3\xa9"}\r\n', b'{"c": [1,  2]}\n']
    F.write_selected(lines, [2, 0], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"c": [1,  2]}\n{"a": 1}\n'
