"""Tests for g2is_jax.store: round trip, resume, refusal of changed configs, kill -9."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import g2is_jax
from g2is_jax.errors import G2ISError
from g2is_jax.store import JOURNAL, PARTIAL, file_sha256, load_features, open_store

N, DIM = 20, 8


def _meta(**changes):
    meta = {
        "model": "tiny",
        "checkpoint": "ckpt-1",
        "gradient": "adam",
        "projection": {"kind": "rademacher", "seed": 0, "dim": DIM},
        "seed": 0,
        "record_ids": [f"rec{i}" for i in range(N)],
        "data_sha256": "ab" * 32,
        "package_version": "0.1.0",
        "checkpoint_lr": 1e-5,
    }
    meta.update(changes)
    return meta


def _rows(idx) -> np.ndarray:
    """Deterministic features: row i depends only on i."""
    return np.stack([np.random.default_rng(i).standard_normal(DIM) for i in idx]).astype(np.float32)


def _expected() -> np.ndarray:
    return _rows(range(N))


def test_round_trip_and_file_layout(tmp_path):
    store = open_store(tmp_path, _meta(), N, DIM)
    for start in range(0, N, 6):  # last batch is short
        store.write(start, _rows(range(start, min(N, start + 6))))
    assert store.missing().size == 0
    path = store.finalize()
    feats, meta = load_features(tmp_path)
    np.testing.assert_array_equal(feats, _expected())
    assert meta["record_ids"] == _meta()["record_ids"] and meta["checkpoint_lr"] == 1e-5
    assert (meta["n"], meta["dim"], meta["dtype"]) == (N, DIM, "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "features.npy", "meta.json"]
    # The very bytes np.save writes, so any .npy reader (and np.load(mmap_mode="r")) works.
    np.save(tmp_path / "ref.npy", _expected())
    assert path.read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert load_features(tmp_path, mmap=True)[0][3, 2] == _expected()[3, 2]


def test_meta_json_bytes_do_not_depend_on_where_the_store_keys_were_given(tmp_path):
    # One process passes meta with "dtype" already in it, the shard merge and the network gather
    # pass meta without: every path must write the same meta.json (CI caught a reordering).
    paths = []
    for i, meta in enumerate([_meta(), {"dtype": "float32", **_meta()},
                              {**_meta(), "n": N, "store_format": 1}]):
        store = open_store(tmp_path / str(i), meta, N, DIM)
        store.write(0, _rows(range(N)))
        store.finalize()
        paths.append(tmp_path / str(i) / "meta.json")
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    assert list(json.loads(first))[-4:] == ["n", "dim", "dtype", "store_format"]


def test_rows_in_any_order_by_index(tmp_path):
    order = np.random.default_rng(0).permutation(N)
    with open_store(tmp_path, _meta(), N, DIM) as store:
        for batch in np.array_split(order, 5):
            store.write(batch, _rows(batch))
        assert store.written(order[:3]).all()
        store.finalize()
    np.testing.assert_array_equal(load_features(tmp_path)[0], _expected())


def test_resume_after_partial_writes_gives_the_same_bytes(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    with open_store(full, _meta(), N, DIM) as store:
        store.write(0, _rows(range(N)))
        store.finalize()
    with open_store(part, _meta(), N, DIM) as store:
        store.write(4, _rows(range(4, 8)))
        store.write([15, 1], _rows([15, 1]))
    with pytest.raises(G2ISError, match=r"incomplete feature store .*: 6/20 rows; re-run"):
        load_features(part)
    with open_store(part, _meta(), N, DIM) as store:
        missing = store.missing()
        assert missing.tolist() == [0, 2, 3, *range(8, 15), *range(16, 20)]
        with pytest.raises(ValueError, match="already written"):
            store.write(4, _rows([4]))
        store.write(missing, _rows(missing))
        with pytest.raises(G2ISError, match="all rows are written; re-run"):
            load_features(part)
        store.finalize()
    assert (part / "features.npy").read_bytes() == (full / "features.npy").read_bytes()
    assert not (part / JOURNAL).exists() and not (part / PARTIAL).exists()


@pytest.mark.parametrize(
    "change, key",
    [
        ({"data_sha256": "cd" * 32}, "data_sha256"),
        ({"model": "other"}, "model"),
        ({"checkpoint": "ckpt-2"}, "checkpoint"),
        ({"gradient": "sgd"}, "gradient"),
        ({"projection": {"kind": "sparse", "seed": 0, "dim": DIM}}, "projection.kind"),
        ({"seed": 1}, "seed"),
        ({"record_ids": [f"rec{i}" for i in range(N - 1)] + ["new"]}, "record_ids: item 19"),
        ({"package_version": "0.2.0"}, "package_version"),
    ],
)
def test_changed_config_is_refused_then_overwrite_starts_again(tmp_path, change, key):
    with open_store(tmp_path, _meta(), N, DIM) as store:
        store.write(0, _rows(range(5)))
    with pytest.raises(G2ISError, match="different input or configuration") as err:
        open_store(tmp_path, _meta(**change), N, DIM)
    assert key in str(err.value) and "--overwrite" in str(err.value) and "--out" in str(err.value)
    with open_store(tmp_path, _meta(**change), N, DIM, overwrite=True) as store:
        assert store.num_written == 0
    (top,) = change
    assert json.loads((tmp_path / "meta.json").read_text())[top] == change[top]


def test_changed_shape_is_refused(tmp_path):
    open_store(tmp_path, _meta(), N, DIM).close()
    with pytest.raises(G2ISError, match="dim: 8 in the store, 16 now"):
        open_store(tmp_path, _meta(), N, 16)
    with pytest.raises(G2ISError, match="record_ids"):  # N changes the id list too
        open_store(tmp_path, _meta(), N + 1, DIM)


def test_ignored_keys_are_not_compared(tmp_path):
    open_store(tmp_path, _meta(started="monday"), N, DIM).close()
    open_store(tmp_path, _meta(started="tuesday"), N, DIM, ignore={"started"}).close()


def test_finished_store_is_not_overwritten_unless_asked(tmp_path):
    with open_store(tmp_path, _meta(), N, DIM) as store:
        store.write(0, _rows(range(N)))
        store.finalize()
    with pytest.raises(G2ISError, match="already holds finished features.*--overwrite"):
        open_store(tmp_path, _meta(), N, DIM)
    np.testing.assert_array_equal(load_features(tmp_path)[0], _expected())
    with open_store(tmp_path, _meta(), N, DIM, overwrite=True) as store:
        assert store.num_written == 0
    assert not (tmp_path / "features.npy").exists()


def test_non_finite_rows_are_refused_with_record_ids(tmp_path):
    with open_store(tmp_path, _meta(), N, DIM) as store:
        rows = _rows(range(6, 12))
        rows[1, 3], rows[4, 0] = np.nan, -np.inf
        with pytest.raises(G2ISError, match=r"2 record\(s\): rec7 \(row 7\), rec10 \(row 10\)"):
            store.write(6, rows)
        assert store.num_written == 0  # nothing of the batch was stored
        store.write(6, _rows(range(6, 12)))  # the same batch, recomputed, goes in
        with pytest.raises(G2ISError, match="rec0"):
            store.write([0], np.full((1, DIM), np.float64(1e300)))  # overflows float32
    with open_store(tmp_path, _meta(), N, DIM) as store:
        assert store.num_written == 6


def test_unchecked_write_stores_rows_bit_for_bit_in_the_order_given(tmp_path):
    """check_finite=False (rows checked where they were computed) skips only the scan; rows
    given out of order, interleaved as a gather step delivers them, land at their offsets."""
    rows = _rows(range(N))
    rows.view(np.uint32)[5, 1] = 0x7FC0_0ABC  # a NaN with a payload, stored as given
    order = np.r_[0:4, 10:14, 4:8, 14:18, 8:10, 18:20]
    with open_store(tmp_path, _meta(), N, DIM) as store:
        with pytest.raises(G2ISError, match="rec5"):
            store.write(order[:10], rows[order[:10]])
        store.write(order[:10], rows[order[:10]], check_finite=False)
        store.write(order[10:], rows[order[10:]], check_finite=False)
        store.finalize()
    assert load_features(tmp_path)[0].tobytes() == rows.tobytes()


def test_network_gather_reads_and_writes_bfloat16_shards_bit_for_bit(tmp_path):
    """The gather path (one process here) reads a bfloat16 shard in its own dtype and writes a
    bfloat16 store byte-identical to it (a float32 reader would misread every row)."""
    from g2is_jax import sharding
    from g2is_jax.featurize import _RowReader
    from g2is_jax.store import FEATURES, row_dtype

    bf16 = row_dtype("bfloat16")
    rows = _rows(range(N))
    with open_store(tmp_path / "shard", _meta(), N, DIM, dtype="bfloat16") as store:
        store.write(0, rows)
        store.finalize()
    reader = _RowReader(tmp_path / "shard" / FEATURES, N, DIM, bf16)
    with open_store(tmp_path / "out", _meta(), N, DIM, dtype="bfloat16") as out:
        steps = sharding.gather_rows_to_primary(
            np.arange(N), reader.read, lambda idx, block: out.write(idx, block,
                                                                    check_finite=False),
            dim=DIM, dtype=bf16, chunk_bytes=4 * (8 + 2 * DIM))
        out.finalize()
    reader.close()
    assert steps == -(-N // 4)
    shard, gathered = (tmp_path / "shard" / FEATURES), (tmp_path / "out" / FEATURES)
    assert gathered.read_bytes() == shard.read_bytes()
    with pytest.raises(G2ISError, match="not this run's"):
        _RowReader(shard, N, DIM)  # read as float32: refused, not misread


def test_torn_journal_tail_is_dropped_on_resume(tmp_path):
    with open_store(tmp_path, _meta(), N, DIM) as store:
        store.write(0, _rows(range(4)))
        store.write([9, 8], _rows([9, 8]))
    journal = tmp_path / JOURNAL
    good = journal.read_bytes()
    # A kill in the middle of appending a record: a prefix of a third record.
    journal.write_bytes(good + good[-40:-10])
    with open_store(tmp_path, _meta(), N, DIM) as store:
        assert store.num_written == 6
        store.write(10, _rows([10]))
    assert journal.stat().st_size > len(good)
    # A flipped bit in the last record: its CRC fails and its rows count as missing.
    raw = bytearray(journal.read_bytes())
    raw[-1] ^= 1
    journal.write_bytes(bytes(raw))
    with open_store(tmp_path, _meta(), N, DIM) as store:
        assert store.missing().tolist() == [4, 5, 6, 7, *range(10, N)]


def test_second_writer_is_refused(tmp_path):
    with (
        open_store(tmp_path, _meta(), N, DIM),
        pytest.raises(G2ISError, match="another process is writing"),
    ):
        open_store(tmp_path, _meta(), N, DIM)
    open_store(tmp_path, _meta(), N, DIM).close()  # released on close


def test_bad_arguments(tmp_path):
    with pytest.raises(G2ISError, match="record_ids"):
        open_store(tmp_path / "a", _meta(), N + 1, DIM)
    with pytest.raises(G2ISError, match="n > 0"):
        open_store(tmp_path / "b", _meta(), 0, DIM)
    with pytest.raises(G2ISError, match="contradicts"):
        open_store(tmp_path / "c", _meta(dim=4), N, DIM)
    with open_store(tmp_path / "d", _meta(), N, DIM) as store:
        with pytest.raises(ValueError, match="shape"):
            store.write(0, np.zeros((2, DIM + 1)))
        with pytest.raises(ValueError, match="outside"):
            store.write(N - 1, np.zeros((2, DIM)))
        with pytest.raises(ValueError, match="distinct"):
            store.write([3, 3], np.zeros((2, DIM)))
        with pytest.raises(G2ISError, match="incomplete: 0/20"):
            store.finalize()
    with pytest.raises(G2ISError, match="no feature store"):
        load_features(tmp_path / "nowhere")


def test_file_sha256(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n' * 100_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(G2ISError, match="cannot hash"):
        file_sha256(tmp_path / "missing.jsonl")


# A writer following a fixed plan of batches, as `g2is grads` does: it skips batches already
# committed and sleeps between batches so that the test can kill it mid-run.
_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from g2is_jax.store import open_store
    out, delay, n, dim, batch = sys.argv[1], float(sys.argv[2]), 60, 16, 4
    meta = {"model": "tiny", "record_ids": [f"r{i}" for i in range(n)]}
    store = open_store(out, meta, n, dim)
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch))
        if store.written(rows).all():
            continue
        feats = np.stack([np.random.default_rng(int(i)).standard_normal(dim) for i in rows])
        store.write(start, feats)
        print(start, flush=True)
        time.sleep(delay)
    store.finalize()
    print("done", flush=True)
    """
)


def _writer(out: Path, delay: float) -> subprocess.Popen:
    root = str(Path(g2is_jax.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(out), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _run_to_end(out: Path) -> None:
    proc = _writer(out, 0.0)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stdout.strip().endswith("done"), stderr[-2000:]


def test_killed_writer_resumes_to_identical_bytes(tmp_path):
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    _run_to_end(ref)
    # Two kills at different points: after a printed batch, and a few ms into the next one.
    for batches_before_kill, extra_sleep in ((3, 0.0), (2, 0.013)):
        proc = _writer(run, 0.05)
        for _ in range(batches_before_kill):
            assert proc.stdout.readline().strip().isdigit()
        time.sleep(extra_sleep)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    with pytest.raises(G2ISError, match=r"incomplete .*: \d+/60 rows; re-run the same command"):
        load_features(run)
    _run_to_end(run)
    assert (run / "features.npy").read_bytes() == (ref / "features.npy").read_bytes()
    assert json.loads((run / "meta.json").read_text()) == json.loads(
        (ref / "meta.json").read_text()
    )
