"""`ompq.pipeline` as a library: a real small run on the zoo model (round-to-nearest PTQ),
its records and report folder, settings validation, a given BitConfig and QAT on a tiny net."""
import functools
import json

import pytest
import torch
from torch import nn

from ompq import zoo
from ompq.bitconfig import CostModel
from ompq.data import fashion_mnist
from ompq.pipeline import (DEFAULT_BITS, PipelineConfig, run_pipeline, uniform_config,
                           write_outputs)
from ompq.ptq import PTQConfig
from ompq.qat import QATConfig

SMALL_PTQ = PTQConfig(num_samples=64, iters=0, act_iters=0)


@functools.lru_cache(maxsize=1)
def _zoo_run():
    """The pipeline on the embedded ResNet-20 at 3 bits per weight, uniform baseline on."""
    model = zoo.load(zoo.DEFAULT_MODEL)
    test = fashion_mnist("test")
    config = PipelineConfig(avg_bits=3.0, bits=(2, 3, 4, 5, 6, 8), uniform=True,
                            profile_samples=16, eval_limit=200, progress=False, ptq=SMALL_PTQ)
    return model, test, run_pipeline(model, fashion_mnist("train"), test, config,
                                     name="resnet20")


def test_zoo_pipeline_records_follow_the_cost_model():
    model, _, res = _zoo_run()
    assert [r["method"] for r in res.results] == ["fp32", "uniform", "ompq"]
    cost = CostModel.from_layers(res.profile.layers)
    budget = res.size_budget_mb
    assert budget == cost.size_mb_at(3.0) and res.bops_budget_g is None
    fp32 = res.record("fp32")
    assert (fp32["size_mb"], fp32["bops_g"]) == (cost.fp32_size_mb(), cost.fp32_bops_g())
    assert fp32["w_bits"] is None and set(fp32["seconds"]) == {"eval"}
    for method in ("uniform", "ompq"):
        rec, cfg = res.record(method), res.configs[method]
        assert rec["size_mb"] == cfg.size_mb == cost.size_mb(cfg.weight_bits)
        assert rec["bops_g"] == cfg.bops_g == cost.bops_g(cfg.weight_bits, cfg.act_bits)
        assert rec["w_bits"] == cfg.weight_bits and set(rec["a_bits"].values()) == {8}
        assert rec["size_mb"] <= budget * (1 + 1e-9)
        assert 0.0 <= rec["top1"] <= 100.0 and not res.models[method].training
        assert res.quant_stats[method]["iters"] == 0
    uni = res.configs["uniform"]
    assert len(set(uni.weight_bits.values())) == 1 and uni.proxy == "uniform"
    again = uniform_config(res.profile, size_mb=budget, bops_g=None, bits=(2, 3, 4, 5, 6, 8),
                           act_bits=8)
    assert again.weight_bits == uni.weight_bits and again.size_mb == uni.size_mb
    assert set(res.record("ompq")["seconds"]) == {"profile", "allocate", "ptq", "eval"}
    assert res.bit_config is res.configs["ompq"]
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # not modified
    assert json.loads(json.dumps(res.to_dict()))["results"][2]["method"] == "ompq"


def test_write_outputs_writes_the_report_folder(tmp_path):
    _, test, res = _zoo_run()
    facts = write_outputs(tmp_path / "out", res, onnx_data=test, onnx_check_limit=64)
    out = tmp_path / "out"
    for name in ("profile.json", "bit_config.json", "bits_per_layer.json",
                 "hawq_bit_config.json", "model.ompq", "model.onnx", "report.json", "report.md",
                 "pareto.png", "export.json"):
        assert (out / name).stat().st_size > 0, name
    assert facts["onnx_check"]["n"] == 64 and abs(facts["packed"]["rel_error"]) <= 0.05
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["fp32", "uniform", "ompq"]
    assert json.loads((out / "export.json").read_text())["packed"] == facts["packed"]
    facts = write_outputs(tmp_path / "no_onnx", res)  # without onnx_data: no ONNX step
    assert "onnx" not in facts and not (tmp_path / "no_onnx" / "model.onnx").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "int8"}, "mode 'int8'"),
    ({"bits": (1, 2)}, "bits: bit-width 1 is not an integer in 2..16"),
    ({"bits": (4, 17)}, "bits: bit-width 17"),
    ({"bits": ()}, "bits: no bit-width given"),
    ({"act_bits": 32}, "act_bits: bit-width 32"),
    ({"size_mb": -1.0}, "size_mb: -1.0 is not a positive finite number"),
    ({"bops_g": float("inf")}, "bops_g: inf is not a positive finite number"),
    ({"size_mb": 0.1, "avg_bits": 3}, "not both"),
    ({"avg_bits": 1.0}, r"avg_bits: 1.0 bits per weight is outside \[2, 16\]"),
    ({"eval_limit": 0}, "eval_limit 0"),
])
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**kwargs)


def test_config_defaults_and_overrides():
    assert PipelineConfig().bits == DEFAULT_BITS["ptq"] == (2, 3, 4)
    assert PipelineConfig(mode="qat").bits == DEFAULT_BITS["qat"]
    assert PipelineConfig(bits=[4, 2, 4]).bits == (2, 4)
    with pytest.raises(ValueError, match="no budget"):  # before any profiling
        run_pipeline(nn.Linear(2, 2), None, None, PipelineConfig())
    with pytest.raises(TypeError, match="unknown PipelineConfig option"):
        run_pipeline(nn.Linear(2, 2), None, None, size_mb=1.0, iters=3)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8, generator=gen),
                                          torch.randint(0, 10, (64,), generator=gen))
    return model, data


def test_given_bit_config_and_qat_on_a_tiny_model():
    model, data = _tiny()
    bits = {"0": 4, "5": 8}
    res = run_pipeline(model, data, data, bit_config=bits, mode="qat", profile_samples=16,
                       progress=False, qat=QATConfig(batch_size=16, max_steps=2))
    cost = CostModel.from_layers(res.profile.layers)
    rec = res.record("ompq")
    assert rec["w_bits"] == bits and rec["size_mb"] == cost.size_mb(bits) > 0
    assert set(rec["seconds"]) == {"profile", "allocate", "qat", "eval"}
    assert res.quant_stats["ompq"]["steps"] == 2 and res.size_budget_mb is None
    with pytest.raises(ValueError, match="not.a.layer"):
        run_pipeline(model, data, data, bit_config={"0": 4, "not.a.layer": 4},
                     profile_samples=16, progress=False, ptq=SMALL_PTQ)
