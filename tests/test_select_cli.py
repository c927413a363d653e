"""`g2is select` and `g2is graph` end to end on small feature stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from g2is_jax import cli
from g2is_jax.select import g2is_select, less_select


@pytest.fixture(autouse=True)
def _only_selection_commands(monkeypatch):
    # The dispatcher imports every subcommand module; test these two without depending on others.
    monkeypatch.setattr(cli, "_COMMANDS", ("graph", "select"))


def write_store(path, array, lr=None):
    path.mkdir(parents=True)
    np.save(path / "features.npy", array)
    meta = {
        "n": array.shape[0],
        "dim": array.shape[1],
        "gradient": "adam",
        "record_ids": [f"id{i}" for i in range(array.shape[0])],
        "checkpoint_lr": lr,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return str(path)


@pytest.fixture()
def pool(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 12))
    t = (centres[rng.integers(0, 4, 300)] + 0.4 * rng.standard_normal((300, 12))).astype(np.float32)
    v = (centres[:2].repeat(3, 0) + 0.4 * rng.standard_normal((6, 12))).astype(np.float32)
    train = write_store(tmp_path / "train", t)
    np.save(tmp_path / "val.npy", v)
    lines = [
        json.dumps({"id": f"id{i}", "text": f"record {i} é"}, ensure_ascii=False) + "\n"
        for i in range(300)
    ]
    (tmp_path / "pool.jsonl").write_bytes("".join(lines).encode())
    return {
        "t": t,
        "v": v,
        "train": train,
        "val": str(tmp_path / "val.npy"),
        "data": str(tmp_path / "pool.jsonl"),
        "lines": lines,
        "tmp": tmp_path,
    }


def test_select_g2is_writes_selection_and_subset(pool, capsys):
    out = pool["tmp"] / "out"
    rc = cli.main(
        [
            "select",
            "--train-features",
            pool["train"],
            "--val-features",
            pool["val"],
            "--ratio",
            "0.05",
            "--delta",
            "0.7",
            "--data",
            pool["data"],
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "selection.json").read_text())
    want = g2is_select(pool["t"], pool["v"], ratio=0.05, delta=0.7)
    assert doc["indices"] == want.indices.tolist() and len(doc["indices"]) == 15
    assert doc["record_ids"] == [f"id{i}" for i in doc["indices"]]
    assert doc["config"]["delta"] == 0.7 and doc["per_component"][0]["budget"] >= 1
    subset = (out / "selected.jsonl").read_bytes()
    assert subset == "".join(pool["lines"][i] for i in doc["indices"]).encode()
    assert "selected 15 of 300" in capsys.readouterr().out


def test_select_less_with_subtasks_and_checkpoints(pool, tmp_path):
    t2 = pool["t"][:, ::-1].copy()
    train = [
        write_store(tmp_path / "c1", pool["t"], lr=2e-5),
        write_store(tmp_path / "c2", t2, lr=1e-5),
    ]
    (tmp_path / "sub.txt").write_text("\n".join("abcabc"))
    args = [
        "select",
        "--method",
        "less",
        "--val-subtasks",
        str(tmp_path / "sub.txt"),
        "--ratio",
        "0.1",
        "--out",
        str(tmp_path / "o"),
    ]
    for t in train:
        args += ["--train-features", t, "--val-features", pool["val"]]
    assert cli.main(args) == 0
    doc = json.loads((tmp_path / "o" / "selection.json").read_text())
    want = less_select(
        [pool["t"], t2],
        [pool["v"], pool["v"]],
        ratio=0.1,
        weights=[2 / 3, 1 / 3],
        subtasks=list("abcabc"),
    )
    assert doc["indices"] == want.indices.tolist()
    np.testing.assert_allclose(doc["config"]["checkpoint_weights"], [2 / 3, 1 / 3])


def test_select_random_and_g2is_over_two_checkpoints(pool, tmp_path):
    out = tmp_path / "r"
    assert (
        cli.main(
            [
                "select",
                "--method",
                "random",
                "--seed",
                "5",
                "--train-features",
                pool["train"],
                "--val-features",
                pool["val"],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(json.loads((out / "selection.json").read_text())["indices"]) == 3
    second = write_store(tmp_path / "c2", pool["t"] * 2.0)
    assert (
        cli.main(
            [
                "select",
                "--train-features",
                pool["train"],
                "--train-features",
                second,
                "--val-features",
                pool["val"],
                "--val-features",
                pool["val"],
                "--ratio",
                "0.05",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    # Two checkpoints with the same directions: the combined geometry is the single one.
    doc = json.loads((tmp_path / "g" / "selection.json").read_text())
    assert len(doc["indices"]) == 15


def test_graph_command_and_select_from_it(pool, tmp_path):
    gfile = tmp_path / "graph.npz"
    assert (
        cli.main(
            ["graph", "--train-features", pool["train"], "--neighbors", "12", "--out", str(gfile)]
        )
        == 0
    )
    with np.load(gfile) as z:
        assert z["indices"].shape == (300, 12) and z["similarities"].shape == (300, 12)
    common = [
        "--train-features",
        pool["train"],
        "--val-features",
        pool["val"],
        "--ratio",
        "0.05",
        "--neighbors",
        "12",
    ]
    assert (
        cli.main(
            [
                "select",
                *common,
                "--mode",
                "graph",
                "--graph",
                str(gfile),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert cli.main(["select", *common, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "selection.json").read_text())["indices"]
    b = json.loads((tmp_path / "b" / "selection.json").read_text())["indices"]
    assert a == b
    mixed = tmp_path / "mixed.npz"
    assert (
        cli.main(
            [
                "graph",
                "--train-features",
                pool["train"],
                "--val-features",
                pool["val"],
                "--mixed",
                "--neighbors",
                "5",
                "--out",
                str(mixed),
            ]
        )
        == 0
    )
    with np.load(mixed) as z:
        assert z["indices"].shape == (306, 5)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--ratio", "0"], "--ratio"),
        (["--delta", "1.5"], "--delta"),
        (["--val-features", "VAL5"], "dimensions disagree"),
        (["--data", "SHORT"], "299 records but"),
        (["--mode", "graph", "--graph", "OTHERGRAPH"], "other features"),
        (["--graph", "OTHERGRAPH"], "--mode graph"),
    ],
)
def test_user_errors_exit_2_without_traceback(pool, tmp_path, capsys, extra, match):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "val5.npy", rng.standard_normal((3, 5)).astype(np.float32))
    (tmp_path / "short.jsonl").write_text("".join(pool["lines"][:299]))
    other = write_store(tmp_path / "other", rng.standard_normal((300, 12)).astype(np.float32))
    cli.main(
        [
            "graph",
            "--train-features",
            other,
            "--neighbors",
            "4",
            "--out",
            str(tmp_path / "other.npz"),
        ]
    )
    subs = {
        "VAL5": str(tmp_path / "val5.npy"),
        "SHORT": str(tmp_path / "short.jsonl"),
        "OTHERGRAPH": str(tmp_path / "other.npz"),
    }
    extra = [subs.get(x, x) for x in extra]
    args = ["select", "--train-features", pool["train"], "--out", str(tmp_path / "o")]
    if "--val-features" not in extra:
        args += ["--val-features", pool["val"]]
    capsys.readouterr()
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "o" / "selection.json").exists()


def test_select_dtype_option(pool, tmp_path, capsys):
    common = ["select", "--train-features", pool["train"], "--val-features", pool["val"]]
    assert cli.main([*common, "--dtype", "bfloat16", "--out", str(tmp_path / "b")]) == 0
    doc = json.loads((tmp_path / "b" / "selection.json").read_text())
    assert len(doc["indices"]) == 3 and doc["config"]["dtype"] == "bfloat16"
    assert cli.main([*common, "--dtype", "float64", "--out", str(tmp_path / "f")]) == 2
    assert "JAX_ENABLE_X64=1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["select", "graph"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert "--train-features" in text
    if command == "select":
        assert "one name per line" in text and "selected.jsonl" in text
