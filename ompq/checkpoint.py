"""Atomic single-file writes for checkpoints, exports, JSON and report files.

Every writer fills a hidden temporary file in the target's folder (``.<stem>.tmp<pid>_<random>
<suffix>``: the target's extension is kept, so writers that pick a format from it, such as
``onnx.save`` or matplotlib's ``savefig``, still do), flushes it to disk (``os.fsync``) and then
renames it over the target with `os.replace`, which is atomic on POSIX and Windows. A reader, or a
run resumed after a crash, therefore sees the old file or the new one, never a partial one.
Missing parent folders are created. When the writer raises anything, KeyboardInterrupt included,
the temporary file is removed and the old file (if any) is left as it was; only a hard kill
(SIGKILL, power loss) between the write and the rename can leave a stray hidden ``.tmp`` file,
never a partial target. A target that is a symbolic link is written through (its destination is
replaced, the link stays).
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["atomic_path", "save_atomic", "write_bytes_atomic", "write_text_atomic"]

PathLike = Union[str, os.PathLike]


def _temp_path(path: PathLike) -> Path:
    """A fresh hidden temporary path next to `path` with the same extension
    (``dir/.<stem>.tmp<pid>_<8 hex digits><suffix>``)."""
    p = Path(path)
    return p.with_name(f".{p.stem}.tmp{os.getpid()}_{secrets.token_hex(4)}{p.suffix}")


def _fsync_file(path: Path) -> None:
    """Flush `path`'s contents to disk, so the rename never exposes unwritten data."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that takes a file name; when the block
    ends normally the file written there is synced and renamed to `path`, when it raises
    (KeyboardInterrupt included) the temporary file is removed and `path` is left untouched.

    >>> with atomic_path("model.onnx") as tmp:   # tmp = .model.tmp<pid>_<hex>.onnx
    ...     onnx.save(proto, str(tmp))
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: PathLike) -> None:
    """`torch.save` `obj` to `path` atomically (see the module docstring)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_bytes_atomic(data: bytes, path: PathLike) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(text: str, path: PathLike) -> None:
    """Write `text` (UTF-8, as given: add the final newline yourself) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
