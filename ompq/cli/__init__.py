"""`ompq` command line: one argparse parser, one module per command (`ompq/cli/<name>.py`).

Each command module defines `add_parser(subparsers)` (registering its sub-parser and setting
`func=run` through `set_defaults`) and `run(args)`, which prints its tables and returns its
JSON result (a dict, or JSON text) for ``--json``. Everything shared (argument types, model and
data resolution, tables, JSON, the error path) is in `ompq.cli.common`; the flow of `quantize`
and `demo` is the library's `ompq.pipeline`. Commands are listed in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .common import EXIT_USAGE, ArgumentParser, UsageError, fail, run_command

COMMANDS = ["demo", "quantize", "eval", "bench", "export", "report", "profile", "allocate"]


def build_parser() -> argparse.ArgumentParser:
    """The `ompq` parser with one sub-parser per command (errors raise `UsageError`)."""
    from .. import __version__

    parser = ArgumentParser(
        prog="ompq", description="Fast, model-agnostic mixed-precision quantization "
        "(OMPQ: layer orthogonality + exact integer bit allocation).")
    parser.add_argument("--version", action="version", version=f"ompq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `ompq` command line; returns the exit status (0 success, 2 bad input or usage,
    130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return fail(err.prog, err)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    return run_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
