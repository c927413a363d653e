"""The public API: every exported name resolves, and the CLI lists every subcommand."""

import subprocess
import sys

import pytest

import g2is_jax
from g2is_jax.cli import _COMMANDS, build_parser


@pytest.mark.parametrize("name", [n for n in g2is_jax.__all__ if n != "__version__"])
def test_export_resolves(name):
    assert getattr(g2is_jax, name) is not None


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        g2is_jax.no_such_thing  # noqa: B018


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for name in _COMMANDS:
        cmd = name.replace("_", "-")
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: g2is " + cmd in capsys.readouterr().out


def test_user_error_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    proc = subprocess.run([sys.executable, "-m", "g2is_jax", "data-check", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "bad.jsonl" in proc.stderr + proc.stdout
