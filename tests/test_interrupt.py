"""Ctrl-C and SIGTERM end a real `ompq` process with one line naming the stage, exit 130 / 143,
and leave no output folder (nor its staging sibling) behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import ompq
from ompq.layers import LayerInfo
from ompq.profile import Profile

QUANTIZE = ["quantize", "--size-mb", "0.1", "--iters", "100000", "--act-iters", "0",
            "--profile-samples", "16", "--calib-samples", "64", "--eval-limit", "100",
            "--no-onnx"]


def _start(args: list[str], cwd) -> tuple[subprocess.Popen, list[str]]:
    """Start `python -m ompq args`; a thread collects its stderr (progress bars included)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ompq", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    chunks: list[str] = []

    def read() -> None:
        for ch in iter(lambda: proc.stderr.read(1), ""):
            chunks.append(ch)

    threading.Thread(target=read, daemon=True).start()
    return proc, chunks


def _wait_for(chunks: list[str], text: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while text not in "".join(chunks):
        assert proc.poll() is None, "".join(chunks)[-2000:]
        assert time.monotonic() < end, f"no {text!r} in: " + "".join(chunks)[-2000:]
        time.sleep(0.2)


def _last_line(chunks: list[str]) -> str:
    lines = [ln.strip() for ln in "".join(chunks).replace("\r", "\n").split("\n")]
    return [ln for ln in lines if ln][-1]


@pytest.mark.parametrize("method", ["ilp", "lp-round"])
def test_ctrl_c_still_raises_after_the_solver(method):
    """CP-SAT installs its own SIGINT handler unless told not to; the process then died on a
    later Ctrl-C instead of raising KeyboardInterrupt."""
    layers = [LayerInfo(f"l{i}", "Linear", 100 * (i + 1), 1000, (10,), (10,)) for i in range(4)]
    prof = Profile(layers=layers, orm=torch.eye(4), num_samples=8, seed=0, feature="auto",
                   debiased=False, timings={}, model="toy")
    ompq.allocate(prof, size_mb=3 * 1000 / 8 / 2 ** 20, bits=(2, 4, 8), proxy="orm-linear",
                  method=method)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)


@pytest.mark.slow  # a real subprocess of the whole flow
@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_during_ptq_after_allocation(tmp_path, sig, code, word):
    out = tmp_path / "run"
    proc, chunks = _start([*QUANTIZE, "--out", str(out)], tmp_path)
    _wait_for(chunks, "PTQ blocks (AdaRound)", proc, timeout=240)  # allocation is done
    time.sleep(1.0)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    line = _last_line(chunks)
    assert line == (f"ompq quantize: {word} during ompq model / PTQ; nothing was left "
                    "half-written"), line
    assert "Traceback" not in "".join(chunks)
    assert sorted(os.listdir(tmp_path)) == []  # no --out folder, no staging sibling


@pytest.mark.slow  # real subprocesses of the whole flow
def test_interrupted_rerun_keeps_the_previous_folder(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "ompq", *QUANTIZE[:3], "--iters", "0",
                           "--profile-samples", "16", "--calib-samples", "64",
                           "--eval-limit", "100", "--no-onnx", "--no-progress", "--out",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    assert "manifest.json" in before and "model.ompq" in before
    proc, chunks = _start([*QUANTIZE, "--out", str(out), "--overwrite"], tmp_path)
    _wait_for(chunks, "PTQ blocks (AdaRound)", proc, timeout=240)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["run"]
