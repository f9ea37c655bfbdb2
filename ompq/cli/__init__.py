"""`ompq` command line: one argparse parser, one module per command (`ompq/cli/<name>.py`).

Each command module defines `add_parser(subparsers)` (registering its sub-parser and setting
`func=run` through `set_defaults`) and `run(args) -> int`. Commands are listed in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ._common import EXIT_USAGE

COMMANDS = ["demo", "quantize", "eval", "export", "report", "profile", "allocate"]


def build_parser() -> argparse.ArgumentParser:
    """The `ompq` parser with one sub-parser per available command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ompq", description="Fast, model-agnostic mixed-precision quantization "
        "(OMPQ: layer orthogonality + exact integer bit allocation).")
    parser.add_argument("--version", action="version", version=f"ompq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `ompq` command line; returns the exit status (0 success, 2 bad input or usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"ompq {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
