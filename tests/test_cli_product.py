"""The product commands end to end: `ompq demo` (reduced iterations, still the real pipeline),
eval/export/report on its outputs, `quantize --out` on a tiny net, and every user-error path
(exit 2, one helpful line)."""
import json

import pytest

from ompq.cli import main

DEMO_ARGS = ["--fast", "--iters", "2", "--act-iters", "1", "--calib-samples", "64",
             "--eval-limit", "300", "--no-progress"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["demo", *DEMO_ARGS, "--out", str(out / "rep"), "--json", str(out / "d.json")])
    assert rc == 0
    return out, buf.getvalue()


@pytest.mark.slow  # the demo fixture: ~2 min on 2 cores
def test_demo_table_and_report_folder(demo_dir):
    out, stdout = demo_dir
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("method"))
    assert all(k in lines[header] for k in ("size MiB", "GBOPs", "top-1 %", "ptq s", "eval s"))
    rows = [lines[header + 2 + i].split()[0] for i in range(3)]
    assert rows == ["fp32", "uniform", "ompq"]
    rep = out / "rep"
    for name in ("report.json", "report.md", "orm_heatmap.png", "bits_importance.png",
                 "pareto.png", "bit_config.json", "profile.json", "bits_per_layer.json",
                 "hawq_bit_config.json", "model.ompq", "model.onnx"):
        assert (rep / name).stat().st_size > 0, name
    d = json.loads((out / "d.json").read_text())
    res = {r["method"]: r for r in d["results"]}
    budget = d["size_budget_mb"]
    assert res["ompq"]["size_mb"] <= budget * (1 + 1e-9)
    assert res["uniform"]["size_mb"] <= budget * (1 + 1e-9)
    assert res["fp32"]["size_mb"] > 10 * budget
    assert all(0.0 <= r["top1"] <= 100.0 for r in d["results"])
    # the accuracy-against-size sweep (--fast: 2 and 4 bits per weight)
    sweep = d["sweep"]
    assert {(r["method"], r["avg_bits"]) for r in sweep} == {
        (m, b) for m in ("error", "uniform", "hawq", "orm-linear") for b in (2.0, 4.0)}
    for r in sweep:
        assert r["size_mb"] <= r["avg_bits"] * budget / 3 * (1 + 1e-9) and r["n"] == 500
    at2 = {r["top1"] for r in sweep if r["avg_bits"] == 2.0}
    assert len(at2) == 1  # every method must put all layers at 2 bits there
    assert "accuracy against size" in stdout
    assert json.loads((rep / "report.json").read_text())["sweep"] == sweep
    pk = d["outputs"]["packed"]
    assert abs(pk["rel_error"]) <= 0.05
    assert d["outputs"]["onnx_check"]["top1_agreement"] >= 99.0


@pytest.mark.slow  # the demo fixture
def test_eval_export_report_on_demo_outputs(demo_dir, tmp_path, capsys):
    out, _ = demo_dir
    rep = out / "rep"
    assert main(["eval", "--packed", str(rep / "model.ompq"), "--limit", "300", "--no-progress",
                 "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    demo = {r["method"]: r for r in json.loads((out / "d.json").read_text())["results"]}
    assert e["n"] == 300 and e["top1"] == pytest.approx(demo["ompq"]["top1"])
    assert main(["export", "--packed", str(rep / "model.ompq"), "--onnx", str(tmp_path / "m.onnx"),
                 "--check-limit", "200", "--hawq", str(tmp_path / "h.json"), "--layer-json",
                 str(tmp_path / "l.json"), "--no-progress", "--json", str(tmp_path / "x.json")]) == 0
    x = json.loads((tmp_path / "x.json").read_text())
    assert x["onnx_check"]["n"] == 200 and x["onnx_check"]["top1_agreement"] >= 99.0
    layer = json.loads((tmp_path / "l.json").read_text())
    assert set(layer) == set(json.loads((rep / "bit_config.json").read_text())["weight_bits"])
    assert main(["report", str(rep), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists() and (tmp_path / "r" / "pareto.png").exists()
    assert "summary:" in capsys.readouterr().out


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_error_unknown_model(capsys):
    _fails(capsys, ["quantize", "--model", "resnet9000", "--size-mb", "0.1", "--no-progress"],
           "resnet9000", "resnet20")


def test_error_unreadable_data(capsys, tmp_path):
    _fails(capsys, ["quantize", "--data", f"imagefolder:{tmp_path / 'nope'}", "--size-mb", "0.1",
                    "--no-progress"], "nope", "imagefolder:PATH")
    _fails(capsys, ["eval", "--data", "mnist-nope", "--no-progress"], "mnist-nope")


@pytest.mark.slow  # runs `quantize` on the zoo model up to the error: ~25 s
def test_error_infeasible_budget(capsys):
    _fails(capsys, ["quantize", "--size-mb", "0.001", "--no-progress"], "--size-mb", "MiB")


@pytest.mark.slow  # runs `quantize` on the zoo model up to the error: ~25 s
def test_error_mismatched_layer_names(capsys, tmp_path):
    bad = tmp_path / "bits.json"
    bad.write_text(json.dumps({"conv1": {"w_bits": 4}, "not.a.layer": {"w_bits": 3}}))
    _fails(capsys, ["quantize", "--bit-config", str(bad), "--no-progress"], "not.a.layer",
           "layer1.0.conv1")


@pytest.mark.slow  # the demo fixture
def test_error_packed_into_wrong_model(capsys, demo_dir):
    out, _ = demo_dir
    _fails(capsys, ["eval", "--packed", str(out / "rep" / "model.ompq"), "--model",
                    "ompq.zoo.models:mobilenetv2", "--no-progress"], "architecture")


def test_error_report_and_export_usage(capsys, tmp_path):
    _fails(capsys, ["report", str(tmp_path / "missing.json")], "no such file or folder")
    (tmp_path / "x.json").write_text('{"conv1": 8}')
    _fails(capsys, ["export", "--bit-config", str(tmp_path / "x.json")], "--onnx")
    _fails(capsys, ["demo", "--avg-bits", "0.5", "--no-progress"], "--avg-bits")


def _hide_onnx(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))


def test_demo_checks_onnx_before_the_long_work(capsys, monkeypatch, tmp_path):
    _hide_onnx(monkeypatch)
    _fails(capsys, ["demo", "--no-progress", "--out", str(tmp_path / "d")],
           "onnx is not installed; pip install onnx")


SMALL = ["--model", "_qmodels:small_net", "--data", "random:1,12,12", "--no-progress"]
SMALL_QUANTIZE = ["quantize", *SMALL, "--size-mb", "0.0003", "--bits", "2,3,4,8", "--uniform",
                  "--iters", "0", "--act-iters", "0", "--calib-samples", "32",
                  "--profile-samples", "16", "--eval-limit", "64"]


def test_quantize_out_and_eval_on_a_small_net(tmp_path, capsys):
    """`quantize --out` through the pipeline on a tiny net (seconds), then `eval --packed`."""
    out, js = tmp_path / "q", tmp_path / "q.json"
    assert main([*SMALL_QUANTIZE, "--out", str(out), "--json", str(js)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("method"))
    assert [lines[header + 2 + i].split()[0] for i in range(3)] == ["fp32", "uniform", "ompq"]
    d = json.loads(js.read_text())
    assert d["command"] == "quantize" and d["mode"] == "ptq" and d["data"] == "random:1,12,12"
    res = {r["method"]: r for r in d["results"]}
    assert res["ompq"]["size_mb"] <= 0.0003 and res["uniform"]["size_mb"] <= 0.0003
    assert d["bit_config"]["weight_bits"] == res["ompq"]["w_bits"]
    for name in ("report.json", "report.md", "model.ompq", "model.onnx", "bit_config.json"):
        assert (out / name).stat().st_size > 0, name
    assert d["outputs"]["onnx_check"]["top1_agreement"] >= 99.0
    assert main(["eval", *SMALL, "--packed", str(out / "model.ompq"), "--limit", "64",
                 "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["top1"] == pytest.approx(res["ompq"]["top1"])
    assert e["size_mb"] == res["ompq"]["size_mb"]


def test_quantize_out_checks_onnx_first_unless_no_onnx(tmp_path, capsys, monkeypatch):
    _hide_onnx(monkeypatch)
    _fails(capsys, [*SMALL_QUANTIZE, "--out", str(tmp_path / "a")],
           "onnx is not installed; pip install onnx", "--no-onnx")
    assert not (tmp_path / "a").exists()
    assert main([*SMALL_QUANTIZE, "--out", str(tmp_path / "b"), "--no-onnx"]) == 0
    assert (tmp_path / "b" / "model.ompq").exists()
    assert not (tmp_path / "b" / "model.onnx").exists()
