"""Output paths: checked before work, folders written all-or-nothing, tied by a manifest.

- `check_output_file` / `check_output_dir`: refuse, before any work, an output that cannot be
  written, a directory where a file is expected, an input used as output, or a non-empty folder
  without `overwrite`.
- `staged_dir(path)`: the artefacts are written into a hidden sibling folder, which is renamed
  into place only when the block ends normally; on any exception (Ctrl-C included) it is
  deleted and `path` is left as it was.
- The last file written is ``manifest.json``: one run id and the size and SHA-256 of every
  file. `verify_dir` refuses a folder whose files do not match it (a mixed folder).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

__all__ = ["MANIFEST", "check_output_file", "check_output_dir", "staged_dir", "write_manifest",
           "read_manifest", "verify_dir", "verify_member", "refresh_manifest"]

PathLike = Union[str, os.PathLike]
MANIFEST = "manifest.json"
FORMAT = "ompq.Manifest"
VERSION = 1


# ----------------------------------------------------------------------------- checks
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _probe_writable(folder: Path, what: str) -> None:
    """Prove that `folder` (or, when it does not exist yet, its nearest existing ancestor, where
    it would be created) is writable, by creating and deleting a file there; creates nothing."""
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{what}: {str(base)!r} is a file, not a folder; choose another path")
    probe = base / f".ompq-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what}: cannot write into {str(base)!r} ({err.strerror or err}); "
                         "choose a writable location") from None


def check_output_file(path: PathLike, *, inputs: Iterable[Optional[PathLike]] = (),
                      what: str = "output file") -> Path:
    """`path` as a Path, after checking it can be written as a file: not a directory, its
    folder writable (created if missing), and not one of `inputs`. ValueError otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory; give a file path")
    for src in inputs:
        if src is not None and _same_file(p, Path(src)):
            raise ValueError(f"{what} {str(p)!r} is also an input; write to another file")
    _probe_writable(p.parent if str(p.parent) else Path("."), f"{what} {str(p)!r}")
    return p


def check_output_dir(path: PathLike, *, overwrite: bool = False,
                     inputs: Iterable[Optional[PathLike]] = (),
                     what: str = "output folder") -> Path:
    """`path` as a Path, after checking it can be (re)written as a folder: not a file, empty or
    absent unless `overwrite`, not holding an input, its parent writable. ValueError otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a file; give a folder path")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise ValueError(f"{what} {str(p)!r} exists and is not empty; pass --overwrite to "
                         "replace it, or choose another folder")
    for src in inputs:
        if src is not None and p.is_dir() and Path(src).resolve().is_relative_to(p.resolve()):
            raise ValueError(f"{what} {str(p)!r} holds the input {str(src)!r}, which "
                             "replacing the folder would delete; write elsewhere")
    parent = p.resolve().parent
    _probe_writable(parent, f"{what} {str(p)!r}")
    return p


# ----------------------------------------------------------------------------- staging
def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_dir(path: PathLike, *, overwrite: bool = False, command: str = "") -> Iterator[Path]:
    """Yield an empty hidden sibling folder of `path` to write into; when the block ends
    normally, write its manifest and rename it to `path` (replacing an existing folder when
    `overwrite`). On any exception the sibling is deleted and `path` is untouched."""
    final = check_output_dir(path, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, command=command)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and deleted after."""
    old = None
    if dst.exists():
        old = _sibling(dst, "old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- manifest
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _digest(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}


def write_manifest(folder: PathLike, *, command: str = "", run_id: Optional[str] = None
                   ) -> dict[str, Any]:
    """Write ``manifest.json`` in `folder` listing every file in it (bytes, SHA-256) under one
    run id (new unless given); returns it."""
    from .checkpoint import write_text_atomic

    folder = Path(folder)
    doc = {"format": FORMAT, "version": VERSION, "run_id": run_id or uuid.uuid4().hex,
           "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "files": _files(folder)}
    write_text_atomic(json.dumps(doc, indent=1) + "\n", folder / MANIFEST)
    return doc


def read_manifest(folder: PathLike) -> Optional[dict[str, Any]]:
    """The manifest of `folder`, or None when it has none; ValueError when it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}; the folder's files cannot be "
                         "checked: write the folder again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an ompq manifest")
    return doc


def verify_dir(folder: PathLike) -> Optional[dict[str, Any]]:
    """Check that every file the manifest of `folder` lists is there, unchanged: ValueError
    naming the first mismatch (a folder mixing two runs). Returns the manifest, or None when
    the folder has none (nothing to check against)."""
    folder = Path(folder)
    doc = read_manifest(folder)
    if doc is None:
        return None
    for name, entry in doc["files"].items():
        _check_entry(folder, name, entry)
    return doc


def verify_member(path: PathLike) -> None:
    """When the folder of file `path` has a manifest, check `path` against it (ValueError)."""
    p = Path(path)
    doc = read_manifest(p.parent)
    if doc is None:
        return
    entry = doc["files"].get(p.name)
    if entry is None:
        raise ValueError(f"{str(p)!r} is not listed in {str(p.parent / MANIFEST)!r}: the folder "
                         "mixes files of different runs; write it again with --overwrite")
    _check_entry(p.parent, p.name, entry)


def _check_entry(folder: Path, name: str, entry: dict[str, Any]) -> None:
    f = folder / name
    if not f.is_file():
        raise ValueError(f"{str(folder)!r} lacks {name!r}, which its {MANIFEST} lists: the "
                         "folder is incomplete; write it again with --overwrite")
    if f.stat().st_size != entry["bytes"] or _digest(f) != entry["sha256"]:
        raise ValueError(f"{str(f)!r} differs from the file its folder's {MANIFEST} lists: the "
                         "folder mixes files of different runs; write it again with --overwrite")


def refresh_manifest(folder: PathLike) -> Optional[dict[str, Any]]:
    """Rewrite the manifest of `folder` (same run id) after files of that run were redrawn,
    e.g. by `ompq report`; None when the folder has no manifest."""
    doc = read_manifest(folder)
    if doc is None:
        return None
    return write_manifest(folder, command=doc.get("command", ""), run_id=doc["run_id"])
