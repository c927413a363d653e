"""The `g2is` command: a thin layer over the library.

Each subcommand lives in its own module with two functions, `register(subparsers)` (adds its
parser and sets `func`) and the function it runs. Errors a user can cause are `G2ISError`s: they
are printed without a traceback and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from g2is_jax.errors import G2ISError
from g2is_jax.io import os_error

# Subcommand modules, in the order `g2is --help` lists them.
_COMMANDS = (
    "demo",
    "run",
    "suite",
    "data_check",
    "evaluate",
    "warmup",
    "grads",
    "plan",
    "graph",
    "select",
    "train",
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``g2is CMD: error: ...``), like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="g2is",
        description="G2IS instruction-data selection by LoRA gradient features (JAX/Flax).",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, including the libraries' own (orbax, jax)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"g2is_jax.cli.{name}").register(sub)
    return parser


def _flag_hint(parser: argparse.ArgumentParser, command: str, exc: G2ISError) -> str:
    """" (--flag)" naming the subcommand's flag for the Python parameter an error names."""
    param = getattr(exc, "param", None)
    if not param:
        return ""
    flag = "--" + param.replace("_", "-")
    for action in parser._subparsers._group_actions:  # the subcommand parsers
        sub = action.choices.get(command)
        if sub is not None and flag in sub._option_string_actions:
            return f" (set by {flag})"
    return ""

class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LibraryNoise(logging.Filter):
    """Drops messages that say nothing to a user of this program: orbax's "Waiting for previous
    save ..." warning, which the training loop triggers by design (it waits on every save)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save")


# Libraries that log through the standard logging module: WARNING unless -v.
_QUIET = ("absl", "orbax", "jax", "flax", "urllib3", "filelock", "datasets", "huggingface_hub")


def setup_logging(verbose: bool = False) -> None:
    """The CLI's logging: INFO (DEBUG with -v) for g2is_jax on stderr, libraries at WARNING.

    Orbax logs through absl, which calls `logging.basicConfig()` (a plain stderr handler on the
    root logger) the first time it logs, often at import; that handler is replaced here by
    ours, and once ours is in place absl's call does nothing. Idempotent; handlers that others
    installed (pytest's, a notebook's) are left alone.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Stderr)]
    for h in root.handlers[:]:  # the bare handler basicConfig() installs (absl does this)
        fmt = getattr(h.formatter, "_fmt", None)
        if type(h) is logging.StreamHandler and fmt == logging.BASIC_FORMAT:
            root.removeHandler(h)
    handler = ours[0] if ours else _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.filters.clear()
    if not verbose:
        handler.addFilter(_LibraryNoise())
    if not ours:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        rc = args.func(args)
    except G2ISError as exc:
        print(f"g2is {args.command}: error: {exc}{_flag_hint(parser, args.command, exc)}",
              file=sys.stderr)
        return 2
    except OSError as exc:  # an output or input the checks could not foresee (full disk, ...)
        where = exc.filename if exc.filename is not None else "a file"
        print(f"g2is {args.command}: error: {os_error(where, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"g2is {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
