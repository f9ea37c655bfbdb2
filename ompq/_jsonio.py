"""Versioned JSON I/O shared by ompq's serialisable results (Profile, BitConfig, reports).

`read_json` is the one reader of "JSON text, a file path or an already parsed dict";
`load_json_payload` adds the ``"format"`` / ``"version"`` check; `write_json` writes text
atomically (`ompq.checkpoint.write_text_atomic`);
`to_jsonable` turns numpy/torch values, tuples and non-finite floats into plain JSON. Errors name
the file when there is one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Union

from .checkpoint import write_text_atomic

PathLike = Union[str, os.PathLike]
JsonSource = Union[str, os.PathLike, Mapping[str, Any], list]


def source_path(src: Any) -> Optional[str]:
    """The file path `src` stands for, or None when it is a dict, a list or JSON text."""
    if isinstance(src, os.PathLike):
        return os.fspath(src)
    if isinstance(src, str) and not src.lstrip().startswith(("{", "[")):
        return src
    return None


def read_json(src: JsonSource, what: str = "JSON") -> Any:
    """Parse `src`: a dict or list (returned as is), JSON text (starts with ``{`` or ``[``) or
    a file path. `what` names the content in errors: FileNotFoundError ``no such <what> file:
    <path>``, ValueError ``cannot read <path>: <reason>`` or ``not valid <what>: <reason>``."""
    if isinstance(src, (Mapping, list)):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"expected {what} text, a file path or a dict, got {type(src).__name__}")
    path = source_path(src)
    if path is None:
        try:
            return json.loads(src)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid {what}: {err}") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what} file: {path!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path!r}: {err}") from None


def check_payload(data: Any, fmt: str, version: int, path: Optional[str] = None) -> dict:
    """`data` itself after checking ``data["format"] == fmt`` and ``1 <= data["version"] <=
    version``; ValueError otherwise (prefixed with `path` when given)."""
    where = f"{path!r}: " if path else ""
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{where}expected JSON with format {fmt!r}, got format {got!r}")
    ver = data.get("version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise ValueError(f"{where}{fmt} JSON has an invalid version {ver!r} (expected an "
                         "integer ≥ 1)")
    if ver > version:
        raise ValueError(f"{where}{fmt} JSON has version {ver}, newer than this ompq reads "
                         f"({version}); upgrade ompq")
    return data


def load_json_payload(src: JsonSource, fmt: str, version: int) -> dict:
    """Read `src` (JSON text, a file path or a dict, see `read_json`) and check its format and
    version (`check_payload`)."""
    return check_payload(read_json(src, f"{fmt} JSON"), fmt, version, source_path(src))


def write_json(text: str, path: Optional[PathLike]) -> str:
    """Write `text` (plus a newline, UTF-8) to `path` when given, atomically: the old file or the
    new one, never a partial one (missing parent folders are created); return the text."""
    if path is not None:
        write_text_atomic(text + "\n", path)
    return text


def to_jsonable(value: Any) -> Any:
    """`value` with numpy/torch scalars and arrays as Python numbers and lists, tuples as lists,
    mapping keys as strings and NaN/±inf as None, ready for `json.dumps`."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fields_to_json(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass `obj` but `exclude`, as a JSON-serialisable dict."""
    import dataclasses

    return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                        if f.name not in exclude})
