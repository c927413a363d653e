"""`g2is data-check`: output on good files, exit status 2 and messages on bad ones."""

from __future__ import annotations

import json

import pytest

from g2is_jax import cli
from g2is_jax.cli import data_check
from g2is_jax.data import build_pool, write_jsonl
from g2is_jax.testing import tiny_tokenizer


@pytest.fixture
def g2is(monkeypatch, capsys):
    """Run `g2is ...` in-process (data-check only, so other subcommands' imports do not matter)
    with `tiny_tokenizer` standing in for --model; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(cli, "_COMMANDS", ("data_check",))
    monkeypatch.setattr(data_check, "_load_tokenizer", lambda model: tiny_tokenizer())

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_help(g2is, capsys):
    with pytest.raises(SystemExit) as e:
        g2is("data-check", "--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--max-length" in out and "Exit status 2" in out


def test_good_file_without_model(g2is, tmp_path):
    path = write_jsonl(build_pool(60, seed=0), tmp_path / "pool.jsonl")
    rc, out, err = g2is("data-check", str(path))
    assert rc == 0, err
    assert "60 good record(s), 0 bad" in out
    assert "formats: messages 60" in out
    assert "kind: clean" in out and "domain:" in out
    assert "tokens: skipped" in out and "--model" in out
    assert out.rstrip().endswith("ok")


def test_good_mixed_file_with_model(g2is, tmp_path):
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "Q: 1+1\nA:", "completion": " 2"},
            {"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"},
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a " * 60},
                ]
            },
        ],
    )
    rc, out, err = g2is("data-check", path, "--model", "tiny", "--max-length", "64")
    assert rc == 0, err
    assert "formats: alpaca 2, messages 1, prompt_completion 1, sharegpt 1" in out
    assert "tokens per record: min" in out
    assert "truncated to 64: 1 of 5" in out and "mixed-4" in out


def test_malformed_file_exits_2_listing_every_problem(g2is, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "b"})
        + "\n"
        + '{"prompt": "a", \n'
        + json.dumps({"messages": [{"role": "user", "content": "q"}]})
        + "\n"
        + json.dumps({"text": "?"})
        + "\n",
        encoding="utf-8",
    )
    rc, out, err = g2is("data-check", str(path))
    assert rc == 2
    assert "1 good record(s), 3 bad" in out
    assert err.startswith("g2is data-check: error: 3 problem(s)")
    assert "record 1 (line 2): malformed JSON" in err
    assert "record 2 (line 3): no assistant turn" in err
    assert "record 3 (line 4): unknown format" in err
    assert "Traceback" not in err


def test_empty_after_truncation_exits_2(g2is, tmp_path):
    path = _jsonl(
        tmp_path / "long.jsonl",
        [
            {
                "id": "long-prompt",
                "messages": [
                    {"role": "user", "content": "word " * 50},
                    {"role": "assistant", "content": "ok"},
                ],
            },
        ],
    )
    rc, out, err = g2is("data-check", path, "--model", "tiny", "--max-length", "16")
    assert rc == 2
    assert "truncated to 16: 1 of 1" in out
    assert "no loss tokens after truncation" in err and "long-prompt" in err
    assert "--max-length" in err
    rc, _, err = g2is("data-check", path, "--model", "tiny", "--max-length", "512")
    assert rc == 0, err


def test_missing_file_and_bad_flag(g2is, tmp_path):
    rc, _, err = g2is("data-check", str(tmp_path / "nope.jsonl"))
    assert rc == 2 and "no such file" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        g2is("data-check", "x.jsonl", "--max-length", "zero")
    assert e.value.code == 2
