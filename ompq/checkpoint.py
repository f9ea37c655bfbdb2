"""Atomic file writes for checkpoints and their metadata.

Each writer fills a hidden temporary file in the target's folder (``.<name>.tmp<pid>``) and then
renames it over the target with `os.replace`, which is atomic on POSIX and Windows: a reader, or
a run resumed after a crash, sees the old file or the new one, never a partial one. Missing
parent folders are created; the temporary file is removed when writing fails.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Union

import torch

__all__ = ["save_atomic", "write_text_atomic"]

PathLike = Union[str, os.PathLike]


def _replace_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: PathLike) -> None:
    """`torch.save` `obj` to `path` atomically (see the module docstring)."""
    _replace_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(text: str, path: PathLike) -> None:
    """Write `text` (UTF-8, as given: add the final newline yourself) to `path` atomically."""
    _replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
