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

# Subcommand modules, in the order `g2is --help` lists them.
_COMMANDS = (
    "demo",
    "run",
    "suite",
    "data_check",
    "evaluate",
    "warmup",
    "grads",
    "graph",
    "select",
    "train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g2is",
        description="G2IS instruction-data selection by LoRA gradient features (JAX/Flax).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except G2ISError as exc:
        print(f"g2is {args.command}: error: {exc}{_flag_hint(parser, args.command, exc)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"g2is {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
