"""Report folder: report.json, PNG figures of the documented pixel size, Markdown summary."""
import json

import matplotlib.image as mpimg
import pytest
import torch
from torch import nn

from ompq import report


def _profile_and_config():
    from ompq.allocate import allocate
    from ompq.profile import profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 24 * 24, 10)).eval()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prof = profile(model, x, num_samples=16, progress=False)
    cfg = allocate(prof, size_mb=3 * sum(l.params for l in prof.layers) / 8 / 2 ** 20,
                   bits=(2, 3, 4))
    return prof, cfg


RESULTS = [
    {"method": "fp32", "size_mb": 0.5, "bops_g": 1.0, "top1": 90.0, "seconds": {"eval": 1.0}},
    {"method": "uniform", "size_mb": 0.05, "bops_g": 0.1, "top1": 80.0,
     "seconds": {"ptq": 3.0, "eval": 1.0}},
    {"method": "uniform", "size_mb": 0.07, "bops_g": 0.12, "top1": 85.0},
    {"method": "ompq", "size_mb": 0.05, "bops_g": 0.1, "top1": 84.0,
     "seconds": {"profile": 0.5, "ptq": 3.0, "eval": 1.0}},
    {"method": "ompq", "size_mb": 0.06, "bops_g": 0.11, "top1": 83.0},
]


def test_write_report_figures_and_json(tmp_path):
    prof, cfg = _profile_and_config()
    paths = report.write_report(tmp_path / "rep", profile=prof, bit_config=cfg, results=RESULTS)
    data = json.loads(paths["report.json"].read_text())
    assert data["format"] == "ompq.Report" and data["version"] == 1
    assert data["profile"]["format"] == "ompq.Profile" and len(data["results"]) == 5
    assert data["bit_config"]["weight_bits"] == cfg.weight_bits
    for name, (w, h) in report.FIGURE_PIXELS.items():
        img = mpimg.imread(paths[name])
        assert img.shape[:2] == (h, w), name
        assert img.std() > 0.01, f"{name} is blank"  # something was drawn
    md = paths["report.md"].read_text()
    assert "| ompq |" in md and "![pareto](pareto.png)" in md
    for n in cfg.weight_bits:
        assert f"| {n} |" in md


def test_render_report_from_json(tmp_path):
    prof, cfg = _profile_and_config()
    report.write_report(tmp_path / "a", profile=prof, bit_config=cfg, results=RESULTS)
    pngs, md = report.render_report(tmp_path / "a" / "report.json", tmp_path / "b")
    assert sorted(p.name for p in pngs) == sorted(report.FIGURE_PIXELS)
    assert all(p.stat().st_size > 1000 for p in pngs) and md.exists()


def test_report_without_profile_has_pareto_only(tmp_path):
    paths = report.write_report(tmp_path, results=RESULTS)
    assert "pareto.png" in paths and "orm_heatmap.png" not in paths


def test_sweep_curves_in_figure_json_and_markdown(tmp_path):
    sweep = [{"method": m, "avg_bits": b, "size_mb": b * 0.03, "top1": 80 + b + d, "n": 2000,
              "stage": "rtn"} for m, d in (("error", 1.0), ("uniform", 0.0)) for b in (2, 3, 4)]
    paths = report.write_report(tmp_path, results=RESULTS, sweep=sweep)
    data = report.load_report(paths["report.json"])
    assert data["sweep"] == sweep
    md = paths["report.md"].read_text()
    assert "## Accuracy against size" in md and "| 3 | 84.00 (0.0900) | 83.00 (0.0900) |" in md
    png, _ = report.render_report(tmp_path, tmp_path / "again")
    assert [p.name for p in png] == ["pareto.png"]


def test_load_report_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        report.load_report(tmp_path / "missing.json")
    (tmp_path / "r.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="expected 'ompq.Report'"):
        report.load_report(tmp_path / "r.json")
    (tmp_path / "r.json").write_text(json.dumps({"format": "ompq.Report", "version": 99}))
    with pytest.raises(ValueError, match="version"):
        report.load_report(tmp_path / "r.json")
