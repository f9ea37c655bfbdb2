"""Shared by the benchmark scripts: write a result dict as JSON (creating the folder)."""
from __future__ import annotations

import json
import os


def write_json(path: str, result: dict) -> None:
    """Write `result` to `path` (indented JSON), creating its folder, and say so on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")
