"""Shared by the benchmark scripts: write a result dict as JSON (creating the folder)."""
from __future__ import annotations

import json
import os
import platform


def write_json(path: str, result: dict) -> None:
    """Write `result` to `path` (indented JSON), creating its folder, and say so on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")


def cpu_name() -> str:
    """The CPU model and its widest vector ISA, from /proc/cpuinfo (the platform elsewhere)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{name} ({isa})" if isa else name
