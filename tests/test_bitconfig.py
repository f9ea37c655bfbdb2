"""BitConfig forms (ompq.bitconfig): HAWQ / per-layer interop, the one coercion
`as_bit_config`, `read_bit_config`, the cost model, and the JSON reader's errors (ompq._jsonio)."""
import json

import numpy as np
import pytest

from ompq import _jsonio, bitconfig
from ompq.bitconfig import BitConfig, CostModel, as_bit_config, read_bit_config
from ompq.layers import LayerInfo

NAMES = ["conv1", "layer1.0.conv1", "fc"]


def _cfg() -> BitConfig:
    return BitConfig(weight_bits={"conv1": 8, "layer1.0.conv1": 3, "fc": 4},
                     act_bits={"conv1": 8, "layer1.0.conv1": 6, "fc": 8}, importance={},
                     size_mb=0.01, bops_g=0.1, status="OPTIMAL", objective=1.0, method="ilp",
                     proxy="orm", budget={"size_mb": 0.01, "bops_g": None}, search_seconds=0.0)


def test_hawq_round_trip():
    cfg = _cfg()
    d = bitconfig.to_hawq_bit_config(cfg)
    assert d["quant_input"] == 8 and d["layer1.0.conv1"] == 3 and d["layer1.0.conv1_act"] == 6
    back = bitconfig.from_hawq_bit_config(d, layer_names=list(cfg.weight_bits))
    assert back.weight_bits == cfg.weight_bits and back.act_bits == cfg.act_bits
    # native HAWQ names through a name map; act keys name the layer whose input they quantize
    native = {"quant_input": 8, "quant_init_block_convbn": 8, "stage1.unit1.quant_act": 6,
              "stage1.unit1.quant_convbn1": 3, "quant_act_output": 8, "quant_output": 4}
    nm = {"quant_init_block_convbn": "conv1", "stage1.unit1.quant_act": "layer1.0.conv1",
          "stage1.unit1.quant_convbn1": "layer1.0.conv1", "quant_output": "fc"}
    got = bitconfig.from_hawq_bit_config(native, name_map=nm, layer_names=list(cfg.weight_bits))
    assert got.weight_bits == cfg.weight_bits and got.act_bits == cfg.act_bits
    with pytest.raises(ValueError, match="unknown"):
        bitconfig.from_hawq_bit_config({**d, "nope": 4}, layer_names=list(cfg.weight_bits))


def test_layer_json_round_trip(tmp_path):
    cfg = _cfg()
    path = bitconfig.write_layer_json(cfg, tmp_path / "bits.json")
    d = json.loads(path.read_text())
    assert d["layer1.0.conv1"] == {"w_bits": 3, "a_bits": 6}
    back = bitconfig.read_layer_json(path, layer_names=list(cfg.weight_bits))
    assert back.weight_bits == cfg.weight_bits and back.act_bits == cfg.act_bits
    with pytest.raises(ValueError, match="missing weight bits"):
        bitconfig.from_layer_json({"conv1": {"w_bits": 4}}, layer_names=list(cfg.weight_bits))
    with pytest.raises(ValueError, match="w_bits"):
        bitconfig.from_layer_json({"conv1": {"bits": 4}})


# ---------------------------------------------------------------------------- as_bit_config
def test_as_bit_config_over_its_input_forms(tmp_path):
    cfg = _cfg()
    assert as_bit_config(cfg) is cfg
    assert as_bit_config(cfg.to_dict()) == cfg  # its JSON dict
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert as_bit_config(path) == cfg and as_bit_config(str(path)) == cfg  # a file
    assert as_bit_config(cfg.to_json()) == cfg  # JSON text
    # a plain dict layer -> bits: every input activation at 8 bits (quantize_'s default)
    plain = as_bit_config({"conv1": 8, "layer1.0.conv1": np.int64(3), "fc": 4})
    assert plain.weight_bits == cfg.weight_bits
    assert plain.act_bits == {n: 8 for n in NAMES}
    assert plain.status == "IMPORTED" and plain.size_mb == 0.0
    # the per-layer form, as a dict and as a file; the HAWQ-style form
    layer = as_bit_config(bitconfig.to_layer_json(cfg))
    assert (layer.weight_bits, layer.act_bits) == (cfg.weight_bits, cfg.act_bits)
    bitconfig.write_layer_json(cfg, tmp_path / "l.json")
    assert as_bit_config(tmp_path / "l.json").act_bits == cfg.act_bits
    hawq = as_bit_config(bitconfig.to_hawq_bit_config(cfg))
    assert (hawq.weight_bits, hawq.act_bits) == (cfg.weight_bits, cfg.act_bits)


def test_as_bit_config_checks_layer_names():
    cfg = _cfg()
    assert as_bit_config(cfg, NAMES) is cfg
    ordered = as_bit_config({"fc": 4, "conv1": 8, "layer1.0.conv1": 3}, NAMES)
    assert list(ordered.weight_bits) == NAMES  # the model's layer order
    with pytest.raises(ValueError, match=r"unknown \['nope'\].*missing weight bits for \['fc'\]"):
        as_bit_config({"conv1": 8, "layer1.0.conv1": 3, "nope": 4}, NAMES)
    with pytest.raises(ValueError, match="valid layer names"):
        as_bit_config(cfg, NAMES[:2])


@pytest.mark.parametrize("bad,err,match", [
    (3, TypeError, "bit_config must be a BitConfig, a dict .* got int"),
    ([("conv1", 4)], TypeError, "got list"),
    ({}, ValueError, "non-empty JSON object"),
    ({"conv1": 4.5}, ValueError, r"bit_config\['conv1'\]: bit-width 4.5 is not an integer in "
                                 r"2\.\.16"),
    ({"conv1": 32}, ValueError, "bit-width 32 is not an integer in 2..16"),
    ({"conv1": {"w_bits": 1}}, ValueError, "layer 'conv1' w_bits: bit-width 1 is not"),
    ({"conv1": {"bits": 4}}, ValueError, "w_bits"),
    ({"format": "ompq.Profile", "version": 2}, ValueError, "format 'ompq.BitConfig'"),
])
def test_as_bit_config_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        as_bit_config(bad)


def test_read_bit_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="no such bit config JSON file: .*missing.json"):
        read_bit_config(missing)
    sweep = tmp_path / "sweep.json"
    sweep.write_text("[]")
    with pytest.raises(ValueError, match="sweep.json.*load_bit_configs"):
        read_bit_config(sweep)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"conv1": {"w_bits": 4}, "x": {"w_bits": 3}}))
    with pytest.raises(ValueError, match=r"wrong.json.*unknown \['x'\]"):
        read_bit_config(wrong, NAMES)
    with pytest.raises(ValueError, match=r"wrong.json.*unknown \['x'\]"):
        bitconfig.read_layer_json(wrong, layer_names=NAMES)


# ---------------------------------------------------------------------------- _jsonio
def test_truncated_json_file_error_names_the_path(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(_cfg().to_json()[:60])
    for load in (BitConfig.from_json, bitconfig.load_bit_configs, read_bit_config,
                 bitconfig.read_layer_json, _jsonio.read_json):
        with pytest.raises(ValueError, match=f"cannot read '{path}': "):
            load(path)
    with pytest.raises(ValueError, match="not valid ompq.BitConfig JSON: Expecting"):
        BitConfig.from_json('{"format": ')
    with pytest.raises(ValueError, match=f"'{path}': expected JSON with format 'ompq.Profile'"):
        path.write_text(_cfg().to_json())
        _jsonio.load_json_payload(path, "ompq.Profile", 2)
    with pytest.raises(TypeError, match="got int"):
        _jsonio.read_json(3)


def test_to_jsonable():
    import torch

    got = _jsonio.to_jsonable({1: (np.float32(0.5), float("nan")), "t": torch.tensor([1, 2]),
                               "inf": float("-inf"), "n": np.int64(3)})
    assert got == {"1": [0.5, None], "t": [1, 2], "inf": None, "n": 3}
    json.dumps(got)


# ---------------------------------------------------------------------------- cost model
def test_cost_model_units():
    layers = [LayerInfo("a", "Conv2d", 1000, 10 ** 6, (4,), (4,)),
              LayerInfo("b", "Linear", 3000, 5 * 10 ** 5, (4,), (4,))]
    cost = CostModel.from_layers(layers)
    assert cost.size_bits({"a": 4, "b": 2}) == 4 * 1000 + 2 * 3000
    assert cost.size_mb([4, 2]) == (4 * 1000 + 2 * 3000) / (8 * 2 ** 20)
    assert cost.bops({"a": 4, "b": 2}, {"a": 6}) == 10 ** 6 * 4 * 6 + 5 * 10 ** 5 * 2 * 8
    assert cost.bops_g(4, 8) == (10 ** 6 + 5 * 10 ** 5) * 32 / 1e9
    assert cost.fp32_size_mb() == 4000 * 32 / (8 * 2 ** 20)
    assert cost.fp32_bops_g() == 1.5e6 * 32 * 32 / 1e9
    assert cost.size_mb_at(2.5) == 2.5 * 4000 / (8 * 2 ** 20)
    imported = as_bit_config({"a": 4, "b": 2})
    done = cost.complete(imported)
    assert (done.size_mb, done.bops_g) == (cost.size_mb([4, 2]), cost.bops_g([4, 2]))
    assert imported.size_mb == 0.0  # complete returns a copy
    with pytest.raises(ValueError, match=r"no parameter/MAC counts for layer\(s\) \['c'\]"):
        cost.size_mb({"c": 4})
    with pytest.raises(ValueError, match="3 values for 2 layers"):
        cost.size_mb([4, 4, 4])
