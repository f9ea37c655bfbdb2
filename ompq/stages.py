"""Named stages of long work (profiling, allocation, PTQ, ...), so an interruption says where.

`stage(name)` marks a block; stages nest, and `current_stage()` is their path (e.g.
"uniform baseline / PTQ"), or "" outside any. An exception leaving a stage (Ctrl-C included)
carries the path where it was raised: `stage_of(err)`. Per thread.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["stage", "current_stage", "stage_of"]

_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run the block as stage `name` (nested inside the current one)."""
    stack = _stack()
    stack.append(name)
    try:
        yield
    except BaseException as err:
        if getattr(err, "ompq_stage", None) is None:
            err.ompq_stage = current_stage()
        raise
    finally:
        stack.pop()


def current_stage() -> str:
    """The stages being run, outermost first, joined by " / " ("" when none)."""
    return " / ".join(_stack())


def stage_of(err: BaseException) -> str:
    """The stage path `err` was raised in ("" when it was raised outside any stage)."""
    return getattr(err, "ompq_stage", None) or ""
