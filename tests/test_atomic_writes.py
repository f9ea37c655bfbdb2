"""Atomic single-file writes (ompq.checkpoint) and the library writers built on them: JSON
(BitConfig/Profile via write_json, write_layer_json) and report files. An interrupted write leaves
the old file (or none) and no temporary file."""
import os
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from ompq import bitconfig, checkpoint, report
from ompq.bitconfig import BitConfig


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_replaces_and_keeps_extension(tmp_path):
    target = tmp_path / "sub" / "fig.png"
    with checkpoint.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png"
        assert tmp.name.startswith(".fig.tmp") and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _names(target.parent) == ["fig.png"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_atomic_path_interrupted_keeps_old_file(tmp_path, exc):
    target = tmp_path / "a.bin"
    checkpoint.write_bytes_atomic(b"old", target)
    with pytest.raises(exc):
        with checkpoint.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["a.bin"]
    with pytest.raises(exc):
        with checkpoint.atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    assert _names(tmp_path) == ["a.bin"]


def test_atomic_write_through_symlink(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    (tmp_path / "link.json").symlink_to(real)
    checkpoint.write_text_atomic("new", tmp_path / "link.json")
    assert (tmp_path / "link.json").is_symlink() and real.read_text() == "new"


def test_save_atomic_interrupted(tmp_path, monkeypatch):
    import torch

    target = tmp_path / "w.pt"
    checkpoint.save_atomic({"a": torch.ones(2)}, target)
    before = target.read_bytes()

    def partial(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", partial)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"a": torch.zeros(2)}, target)
    assert target.read_bytes() == before and _names(tmp_path) == ["w.pt"]


def _cfg(bits: int = 4) -> BitConfig:
    return BitConfig(weight_bits={"a": bits, "b": 8}, act_bits={"a": 8, "b": 8}, importance={},
                     size_mb=0.01, bops_g=0.1, status="OPTIMAL", objective=1.0, method="ilp",
                     proxy="orm", budget={"size_mb": 0.01, "bops_g": None}, search_seconds=0.0)


def test_json_writers_interrupted(tmp_path, monkeypatch):
    _cfg(4).to_json(tmp_path / "c.json")
    bitconfig.save_bit_configs([_cfg(4)], tmp_path / "s.json")
    bitconfig.write_layer_json(_cfg(4), tmp_path / "l.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write_text = Path.write_text

    def partial(self, text, *args, **kwargs):
        real_write_text(self, text[:10], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", partial)
    for write in (lambda: _cfg(2).to_json(tmp_path / "c.json"),
                  lambda: bitconfig.save_bit_configs([_cfg(2)], tmp_path / "s.json"),
                  lambda: bitconfig.write_layer_json(_cfg(2), tmp_path / "l.json")):
        with pytest.raises(KeyboardInterrupt):
            write()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert BitConfig.from_json(tmp_path / "c.json") == _cfg(4)


RESULTS = [{"method": "fp32", "size_mb": 0.5, "bops_g": 1.0, "top1": 90.0},
           {"method": "ompq", "size_mb": 0.05, "bops_g": 0.1, "top1": 84.0}]


def test_report_figure_interrupted(tmp_path, monkeypatch):
    paths = report.write_report(tmp_path, results=RESULTS)
    old_png = paths["pareto.png"].read_bytes()
    real_savefig = Figure.savefig

    def partial(self, fname, *args, **kwargs):
        assert Path(fname).suffix == ".png" and Path(fname).name.startswith(".pareto.tmp")
        real_savefig(self, fname, *args, **kwargs)
        Path(fname).write_bytes(Path(fname).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", partial)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(tmp_path, results=RESULTS[:1])
    assert paths["pareto.png"].read_bytes() == old_png
    assert _names(tmp_path) == ["pareto.png", "report.json", "report.md"]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))
