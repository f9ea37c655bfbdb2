"""Careless inputs against every `ompq` command: a table of rows, each run as a real user would
(a subprocess `python -m ompq ...` for a representative subset, `ompq.cli.main(argv)` in-process
for the rest). Every row must end with exit code 2 and ONE line on stderr that names the
offending value, no traceback, the input files unchanged byte for byte and no output file left
behind (not even a partial one). Also: missing optional modules are reported before any work,
and ``--json -`` keeps stdout pure JSON for every command."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

from _qmodels import quantized_net, small_net
from ompq.cli import main
from ompq.packed import save_packed
from ompq.profile import profile

TESTS = Path(__file__).resolve().parent
MODEL = "_qmodels:small_net"
DATA = "random:1,12,12"
SMALL = ("--model", MODEL, "--data", DATA, "--no-progress")
TINY_Q = ("--iters", "0", "--act-iters", "0", "--calib-samples", "32",
          "--profile-samples", "16", "--eval-limit", "64")
TINY_DEMO = ("--iters", "0", "--act-iters", "0", "--calib-samples", "32", "--eval-limit", "64")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: A folder no one may create, root included (sysfs refuses new entries): the unwritable
#: output rows that also run as root.
UNWRITABLE = "/sys/ompq-unwritable"


# ============================================================================ inputs
def _flip_byte(src: Path, dst: Path, at: int) -> None:
    """Copy `src` with its byte at offset `at` (negative: from the end) inverted."""
    raw = bytearray(src.read_bytes())
    raw[at] ^= 0xFF
    dst.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Iterator[Path]:
    """The input files every row may read (never written: each row checks they stay as they
    are): a profile, a packed checkpoint and broken copies of both, bit configs, a report, an
    empty image folder, an existing empty folder and a read-only one."""
    root = tmp_path_factory.mktemp("inputs")
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    profile(small_net(), x, num_samples=32, progress=False).to_json(root / "p.json")
    save_packed(quantized_net(x), root / "m.ompq")
    _flip_byte(root / "m.ompq", root / "flipped_data.ompq", -1)  # the last weight byte
    _flip_byte(root / "m.ompq", root / "flipped_head.ompq", 40)  # inside the JSON header
    raw = (root / "m.ompq").read_bytes()
    (root / "truncated.ompq").write_bytes(raw[: len(raw) // 2])
    text = (root / "p.json").read_text()
    (root / "trunc_profile.json").write_text(text[: len(text) // 2])
    (root / "bad_cfg.json").write_text(json.dumps({"0": 4, "3": 4, "nope": 4}))
    (root / "cfg.json").write_text(json.dumps({"0": 4, "3": 4, "8": 8}))
    (root / "report.json").write_text(json.dumps({"format": "ompq.Report", "version": 1,
                                                  "results": []}))
    (root / "trunc_report.json").write_text('{"format": "ompq.Report", "vers')
    (root / "empty_images").mkdir()
    (root / "a_dir").mkdir()
    (root / "full_dir").mkdir()
    (root / "full_dir" / "keep.txt").write_text("keep")
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)
    yield root
    (root / "ro").chmod(0o755)


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file under `folder` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ============================================================================ the matrix
@dataclass(frozen=True)
class Row:
    """One careless command line. `argv` may hold {ws} (the inputs), {out} (an empty folder for
    outputs); `needles`: what the one error line must name. `sub`: run as a subprocess.
    `nonroot`: a permission check, which root passes (skipped there). `owner`: whose in-progress
    work the behaviour belongs to, when it is not this file's commands' own."""

    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    sub: bool = False
    nonroot: bool = False
    owner: str = ""

    @property
    def skip_reason(self) -> Optional[str]:
        """Why this row cannot run here, or None."""
        if self.nonroot and IS_ROOT:
            return "runs as root, which passes every permission check"
        if any(UNWRITABLE in a for a in self.argv) and not os.path.isdir("/sys/kernel"):
            return f"no sysfs here to stand for an unwritable folder ({UNWRITABLE})"
        return None


ROWS = [
    # unknown model, every command that takes one
    Row("profile-unknown-model", ("profile", "--model", "nope_model", "--data", DATA,
                                  "--no-progress"), ("nope_model",), sub=True),
    Row("allocate-unknown-model", ("allocate", "--model", "nope_model", "--data", DATA,
                                   "--size-mb", "1", "--no-progress"), ("nope_model",)),
    Row("quantize-unknown-model", ("quantize", "--model", "nope_model", "--data", DATA,
                                   "--size-mb", "1", "--no-progress"), ("nope_model",)),
    Row("demo-unknown-model", ("demo", "--model", "nope_model", "--data", DATA, "--fast",
                               "--out", "{out}/demo", "--no-progress"), ("nope_model",)),
    Row("eval-unknown-model", ("eval", "--model", "nope_model", "--data", DATA,
                               "--no-progress"), ("nope_model",)),
    Row("export-unknown-model", ("export", "--packed", "{ws}/m.ompq", "--model", "nope_model",
                                 "--onnx", "{out}/m.onnx", "--check-data", "none",
                                 "--no-progress"), ("nope_model",)),
    # infeasible budgets: the message states the achievable range
    Row("allocate-infeasible", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1e-9",
                                "--no-progress"), ("1e-09", "size ranges from", "MiB")),
    Row("quantize-infeasible", ("quantize", *SMALL, "--size-mb", "1e-9", *TINY_Q),
        ("1e-09", "size ranges from", "--bits")),
    Row("demo-infeasible", ("demo", *SMALL, "--avg-bits", "2", "--bits", "4,8", "--fast",
                            "--no-sweep", "--out", "{out}/demo"), ("size ranges from",)),
    # bit-widths: not a number, out of range (1 and 17), on every command that takes them
    Row("allocate-bits-x", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
                            "--bits", "2,x"), ("--bits", "'x'", "2..16"), sub=True),
    Row("allocate-bits-1", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
                            "--bits", "1,4"), ("--bits", "bit-width 1 ", "2..16")),
    Row("allocate-bits-17", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
                             "--bits", "4,17"), ("--bits", "bit-width 17 ", "2..16")),
    Row("quantize-bits-x", ("quantize", *SMALL, "--size-mb", "1", "--bits", "2,x"),
        ("--bits", "'x'", "2..16")),
    Row("quantize-bits-1", ("quantize", *SMALL, "--size-mb", "1", "--bits", "1,4"),
        ("--bits", "bit-width 1 ", "2..16")),
    Row("quantize-act-bits-17", ("quantize", *SMALL, "--size-mb", "1", "--act-bits", "17"),
        ("--act-bits", "bit-width 17 ", "2..16")),
    Row("demo-bits-17", ("demo", *SMALL, "--bits", "4,17", "--out", "{out}/demo"),
        ("--bits", "bit-width 17 ", "2..16")),
    Row("profile-distortion-bits-1", ("profile", *SMALL, "--distortion-bits", "1,4"),
        ("--distortion-bits", "bit-width 1 ", "2..16")),
    Row("allocate-pin-bits-32", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
                                 "--pin", "0=32"), ("--pin", "bit-width 32 ", "2..16")),
    # layer names that do not match
    Row("quantize-bit-config-names", ("quantize", *SMALL, "--bit-config", "{ws}/bad_cfg.json",
                                      *TINY_Q), ("'nope'", "valid layer names")),
    Row("allocate-pin-matches-nothing", ("allocate", "--profile", "{ws}/p.json", "--size-mb",
                                         "1", "--pin", "conv_nothing=8", "--no-progress"),
        ("'conv_nothing'", "matches no layer", "layers:")),
    Row("profile-include-matches-nothing", ("profile", *SMALL, "--include", "zz*"),
        ("'zz*'", "matches no layer")),
    # micro-batches, token masks and data factories (large models)
    Row("profile-batch-size-3", ("profile", *SMALL, "--batch-size", "3"),
        ("--batch-size", "'3'", ">= 4"), sub=True),
    Row("profile-mask-key-missing", ("profile", "--model", "ompq.zoo.transformer:tiny_encoder",
                                     "--data", "ompq.zoo.transformer:tokens", "-n", "8",
                                     "--mask", "pad", "--no-progress"),
        ("mask='pad'", "names no entry", "attention_mask")),
    Row("profile-data-factory-missing", ("profile", *SMALL[:2], "--data", "nope_mod:fn",
                                         "--no-progress"), ("'nope_mod'", "module.path:factory")),
    # data that is not there
    Row("eval-empty-image-folder", ("eval", "--model", MODEL, "--data",
                                    "imagefolder:{ws}/empty_images", "--no-progress"),
        ("empty_images",)),
    Row("profile-empty-image-folder", ("profile", "--model", MODEL, "--data",
                                       "imagefolder:{ws}/empty_images", "--no-progress"),
        ("empty_images",)),
    # input files: missing, truncated, corrupted
    Row("eval-packed-missing", ("eval", *SMALL, "--packed", "/nonexistent/x"),
        ("/nonexistent/x",), sub=True),
    Row("allocate-profile-missing", ("allocate", "--profile", "{ws}/missing.json",
                                     "--size-mb", "1", "--no-progress"), ("missing.json",)),
    Row("quantize-bit-config-missing", ("quantize", *SMALL, "--bit-config",
                                        "{ws}/missing.json"), ("missing.json",)),
    Row("export-bit-config-missing", ("export", "--bit-config", "{ws}/missing.json",
                                      "--hawq", "{out}/h.json"), ("missing.json",)),
    Row("report-missing", ("report", "{ws}/missing.json"), ("missing.json",), sub=True),
    Row("allocate-profile-truncated", ("allocate", "--profile", "{ws}/trunc_profile.json",
                                       "--size-mb", "1", "--no-progress"),
        ("trunc_profile.json",), sub=True),
    Row("report-truncated", ("report", "{ws}/trunc_report.json"), ("trunc_report.json",)),
    Row("eval-packed-flipped-data", ("eval", *SMALL, "--packed", "{ws}/flipped_data.ompq"),
        ("flipped_data.ompq",), owner="packed checksums"),
    Row("eval-packed-flipped-header", ("eval", *SMALL, "--packed", "{ws}/flipped_head.ompq"),
        ("flipped_head.ompq",), owner="packed checksums"),
    Row("eval-packed-truncated", ("eval", *SMALL, "--packed", "{ws}/truncated.ompq"),
        ("truncated.ompq",), owner="packed checksums"),
    Row("eval-fake-quant-packed-flipped", ("eval", *SMALL, "--packed",
                                           "{ws}/flipped_data.ompq", "--fake-quant"),
        ("flipped_data.ompq",), owner="packed checksums"),
    Row("bench-packed-missing", ("bench", *SMALL, "--packed", "/nonexistent/x"),
        ("/nonexistent/x",)),
    Row("bench-packed-flipped", ("bench", *SMALL, "--packed", "{ws}/flipped_data.ompq"),
        ("flipped_data.ompq",), sub=True, owner="packed checksums"),
    Row("bench-packed-wrong-model", ("bench", "--model", "resnet20", "--data", DATA,
                                     "--packed", "{ws}/m.ompq", "--no-progress"),
        ("lacks", "Sequential")),
    Row("bench-batch-0", ("bench", *SMALL, "--packed", "{ws}/m.ompq", "--batch", "1,0"),
        ("--batch", "'0'")),
    Row("export-packed-flipped", ("export", "--packed", "{ws}/flipped_data.ompq", "--model",
                                  MODEL, "--onnx", "{out}/m.onnx", "--check-data", "none",
                                  "--no-progress"), ("flipped_data.ompq",), sub=True,
        owner="packed checksums"),
    Row("export-packed-truncated", ("export", "--packed", "{ws}/truncated.ompq", "--model",
                                    MODEL, "--hawq", "{out}/h.json"), ("truncated.ompq",),
        owner="packed checksums"),
    # output paths: a folder where a file is expected, read-only, the input itself
    Row("profile-json-is-a-dir", ("profile", *SMALL, "--json", "{ws}/a_dir"), ("a_dir",),
        owner="output-path validation"),
    Row("allocate-json-is-a-dir", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
                                   "--json", "{ws}/a_dir"), ("a_dir",),
        owner="output-path validation"),
    Row("export-hawq-is-a-dir", ("export", "--bit-config", "{ws}/cfg.json", "--hawq",
                                 "{ws}/a_dir"), ("a_dir",), owner="output-path validation"),
    Row("allocate-same-file", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
                               "--json", "{ws}/p.json", "--no-progress"), ("p.json",),
        sub=True, owner="output-path validation"),
    Row("profile-json-read-only", ("profile", *SMALL, "--json", "{ws}/ro/p.json"), ("ro",),
        nonroot=True, owner="output-path validation"),
    Row("export-layer-json-read-only", ("export", "--bit-config", "{ws}/cfg.json",
                                        "--layer-json", "{ws}/ro/l.json"), ("ro",),
        nonroot=True, owner="output-path validation"),
    Row("quantize-out-read-only", ("quantize", *SMALL, "--size-mb", "1", "--out", "{ws}/ro/q",
                                   "--no-onnx", *TINY_Q), ("ro",), nonroot=True,
        owner="--out folder handling"),
    Row("report-out-read-only", ("report", "{ws}/report.json", "--out", "{ws}/ro/r"), ("ro",),
        nonroot=True, owner="output-path validation"),
    Row("profile-json-unwritable", ("profile", *SMALL, "--json", f"{UNWRITABLE}/p.json"),
        (UNWRITABLE,), owner="output-path validation"),
    Row("export-layer-json-unwritable", ("export", "--bit-config", "{ws}/cfg.json",
                                         "--layer-json", f"{UNWRITABLE}/l.json"),
        (UNWRITABLE,), owner="output-path validation"),
    Row("quantize-out-unwritable", ("quantize", *SMALL, "--size-mb", "1", "--out",
                                    f"{UNWRITABLE}/q", "--no-onnx", *TINY_Q), (UNWRITABLE,),
        sub=True, owner="--out folder handling"),
    Row("report-out-unwritable", ("report", "{ws}/report.json", "--out", f"{UNWRITABLE}/r"),
        (UNWRITABLE,), owner="output-path validation"),
    Row("quantize-out-is-a-file", ("quantize", *SMALL, "--size-mb", "1", "--out",
                                   "{ws}/p.json", "--no-onnx", *TINY_Q), ("p.json",),
        owner="--out folder handling"),
    Row("demo-out-not-empty", ("demo", *SMALL, "--fast", "--no-sweep", "--out",
                               "{ws}/full_dir"), ("full_dir", "--overwrite"),
        owner="--out folder handling"),
    # budgets and limits that are not positive
    Row("allocate-size-zero", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "0"),
        ("--size-mb", "0.0 is not a positive")),
    Row("allocate-bops-negative", ("allocate", "--profile", "{ws}/p.json", "--bops-g", "-1"),
        ("--bops-g", "-1.0 is not a positive")),
    Row("quantize-size-zero", ("quantize", *SMALL, "--size-mb", "0"),
        ("--size-mb", "0.0 is not a positive"), sub=True),
    Row("quantize-bops-nan", ("quantize", *SMALL, "--bops-g", "nan"),
        ("--bops-g", "nan is not a positive")),
    Row("demo-avg-bits-zero", ("demo", *SMALL, "--avg-bits", "0", "--out", "{out}/demo"),
        ("--avg-bits", "0.0")),
    Row("quantize-eval-limit-0", ("quantize", *SMALL, "--size-mb", "1", "--eval-limit", "0"),
        ("--eval-limit", "'0'")),
    Row("demo-eval-limit-0", ("demo", *SMALL, "--eval-limit", "0", "--out", "{out}/demo"),
        ("--eval-limit", "'0'"), sub=True),
    Row("eval-limit-0", ("eval", *SMALL, "--limit", "0"), ("--limit", "'0'")),
]


def _fill(argv: tuple[str, ...], ws: Path, out: Path) -> list[str]:
    return [a.format(ws=ws, out=out) for a in argv]


def _run(argv: list[str], sub: bool, cwd: Path, capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ompq argv`: a subprocess, or `main` in-process."""
    if sub:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
        env.pop("OMPQ_DEBUG", None)
        proc = subprocess.run([sys.executable, "-m", "ompq", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    code = main(argv)
    cap = capfd.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_careless_input(row: Row, ws: Path, tmp_path: Path, capfd, monkeypatch):
    if row.skip_reason:
        pytest.skip(row.skip_reason)
    monkeypatch.delenv("OMPQ_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder either
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(ws)
    code, stdout, stderr = _run(_fill(row.argv, ws, out), row.sub, tmp_path, capfd)
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr + stdout, stderr[-2000:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"ompq {row.argv[0]}: error: "), lines[0]
    missing = [n.format(ws=ws, out=out) for n in row.needles
               if n.format(ws=ws, out=out) not in lines[0]]
    assert not missing, (missing, lines[0])
    assert _snapshot(ws) == before, "an input file changed or a file was left among the inputs"
    left = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    assert not left, f"files left behind: {left}"


# ============================================================================ dependencies
def _hide(monkeypatch, *modules: str) -> None:
    """Make `modules` look not installed (`importlib.util.find_spec` → None)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in modules else real(name, *a))


@pytest.mark.parametrize("hidden, argv", [
    ("ortools", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1")),
    ("scipy", ("allocate", "--profile", "{ws}/p.json", "--size-mb", "1",
               "--method", "lp-round")),
    ("ortools", ("quantize", *SMALL, "--size-mb", "1")),
    ("matplotlib", ("quantize", *SMALL, "--size-mb", "1", "--out", "{out}/q", "--no-onnx")),
    ("onnxruntime", ("quantize", *SMALL, "--size-mb", "1", "--out", "{out}/q")),
    ("onnx", ("demo", *SMALL, "--fast", "--out", "{out}/demo")),
    ("matplotlib", ("demo", *SMALL, "--fast", "--out", "{out}/demo")),
    ("onnxruntime", ("export", "--packed", "{ws}/m.ompq", "--model", MODEL, "--onnx",
                     "{out}/m.onnx", "--check-data", DATA)),
    ("matplotlib", ("report", "{ws}/report.json", "--out", "{out}/r")),
    ("PIL", ("eval", "--model", MODEL, "--data", "imagefolder:{ws}/empty_images")),
], ids=lambda v: v if isinstance(v, str) else v[0])
def test_missing_module_stops_before_work(hidden, argv, ws, tmp_path, capfd, monkeypatch):
    _hide(monkeypatch, hidden)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = _run(_fill(argv, ws, out), False, tmp_path, capfd)
    assert code == 2, stderr
    package = {"PIL": "pillow"}.get(hidden, hidden)
    hint = " (or pass --no-onnx)" if argv[0] == "quantize" and "onnx" in hidden else ""
    assert stderr.strip() == (f"ompq {argv[0]}: error: {hidden} is not installed; pip install "
                              f"{package}{hint}"), stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# ============================================================================ --json -
def _json_stdout(argv: list[str], capfd) -> dict:
    """Run `argv` + ``--json -`` in-process; stdout (file descriptor 1: C-level writes count
    too) must be one JSON document."""
    assert main([*argv, "--json", "-"]) == 0
    cap = capfd.readouterr()
    assert cap.out.strip(), cap.err[-2000:]
    return json.loads(cap.out)


def test_json_dash_keeps_stdout_pure_json(ws, tmp_path, capfd, monkeypatch):
    """Every command, with tables and "wrote ..." lines on stderr only."""
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "p.json"
    assert _json_stdout(["profile", *SMALL, "-n", "16"], capfd)["format"] == "ompq.Profile"
    shutil.copy(ws / "p.json", p)
    assert _json_stdout(["allocate", "--profile", str(p), "--size-mb", "0.0003,0.0004",
                         "--no-progress"], capfd)[0]["format"] == "ompq.BitConfig"
    q = _json_stdout(["quantize", *SMALL, "--size-mb", "0.0003", "--bits", "2,3,4,8",
                      *TINY_Q, "--out", str(tmp_path / "q")], capfd)
    assert q["command"] == "quantize"
    packed = str(tmp_path / "q" / "model.ompq")
    assert _json_stdout(["eval", *SMALL, "--packed", packed, "--limit", "32"],
                        capfd)["method"] == "packed"
    assert "onnx" in _json_stdout(["export", "--packed", packed, "--model", MODEL, "--onnx",
                                   str(tmp_path / "m.onnx"), "--check-data", DATA,
                                   "--check-limit", "16", "--hawq", str(tmp_path / "h.json"),
                                   "--no-progress"], capfd)
    assert _json_stdout(["report", str(tmp_path / "q"), "--out", str(tmp_path / "r")],
                        capfd)["command"] == "report"
    demo = _json_stdout(["demo", *SMALL, "--fast", "--no-sweep", *TINY_DEMO, "--out",
                         str(tmp_path / "demo")], capfd)
    assert demo["command"] == "demo"
