"""Export: bit packing, packed checkpoint round trip (exact outputs, size), ONNX QDQ in
onnxruntime, HAWQ / per-layer interop."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from ompq import export
from ompq import quantizers as qz


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


BITS = {"0": 3, "3": 2, "8": 5}


def _quantized(x: torch.Tensor, symmetric: bool = False) -> nn.Module:
    m = _net()
    qz.fold_bn(m, x[:4])
    qz.quantize_(m, BITS, weight_symmetric=symmetric)
    qz.calibrate_activations(m, [x])
    return m


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(bits, gen):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=gen).numpy()
    stream = export.pack_bits(codes, bits)
    assert stream.dtype == np.uint8 and stream.size == -(-codes.size * bits // 8)
    assert np.array_equal(export.unpack_bits(stream, bits, codes.size), codes)


def test_pack_is_lsb_first():
    # codes 1 (=0b01) and 2 (=0b10) at 2 bits: stream bits 1,0,0,1 -> byte 0b1001 = 9
    assert export.pack_bits(np.array([1, 2]), 2).tolist() == [9]
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        export.pack_bits(np.array([4]), 2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_round_trip_exact(tmp_path, gen, symmetric):
    x = torch.randn(32, 1, 28, 28, generator=gen)
    model = _quantized(x, symmetric)
    ref = model(x)
    info = export.save_packed(model, tmp_path / "m.ompq")
    params = {"0": 72, "3": 16 * 4 * 9, "8": 160}
    assert info.weight_bytes == sum(-(-params[n] * b // 8) for n, b in BITS.items())
    assert info.within(0.05), info.to_dict()
    # a fresh float model: BN folding and quantized layers are replayed from the file
    loaded = export.load_packed(tmp_path / "m.ompq", _net)
    assert torch.equal(loaded(x), ref)
    assert isinstance(loaded[1], nn.Identity)


def test_packed_after_ptq_and_size_vs_bitconfig(tmp_path):
    from ompq.allocate import allocate
    from ompq.profile import profile
    from ompq.ptq import ptq

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 28, 28, generator=g)
    fp = _net()
    prof = profile(fp, x, num_samples=32, progress=False)
    cfg = allocate(prof, size_mb=3.2 * sum(l.params for l in prof.layers) / 8 / 2 ** 20,
                   bits=(2, 3, 4))
    q = ptq(fp, cfg, x, num_samples=64, iters=3, act_iters=2, progress=False)
    info = export.save_packed(q, tmp_path / "p.ompq", cfg)
    assert abs(info.weight_bytes - cfg.size_mb * 2 ** 20) < len(cfg.weight_bits)
    assert info.within(0.05)
    loaded = export.load_packed(tmp_path / "p.ompq", _net)
    assert torch.equal(loaded(x), q(x))
    with pytest.raises(ValueError, match="differ"):
        bad = json.loads(cfg.to_json())
        bad["weight_bits"]["0"] = 8 if cfg.weight_bits["0"] != 8 else 2
        export.save_packed(q, tmp_path / "bad.ompq", bad)


def test_load_packed_wrong_architecture(tmp_path, gen):
    x = torch.randn(8, 1, 28, 28, generator=gen)
    export.save_packed(_quantized(x), tmp_path / "m.ompq")
    with pytest.raises(ValueError, match="lacks"):
        export.load_packed(tmp_path / "m.ompq", lambda: nn.Sequential(nn.Linear(3, 3)))
    (tmp_path / "junk.ompq").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not an ompq packed checkpoint"):
        export.load_packed(tmp_path / "junk.ompq", _net)


@pytest.mark.parametrize("opset,int4", [(17, False), (21, True)])
def test_onnx_qdq_small(tmp_path, gen, opset, int4):
    import onnx

    x = torch.randn(64, 1, 28, 28, generator=gen)
    model = _quantized(x)
    info = export.export_onnx(model, tmp_path / "m.onnx", x[:2], opset=opset, int4=int4)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    assert "Clip" not in ops  # 8-bit activations need no clip
    types = {t.name: t.data_type for t in proto.graph.initializer}
    codes = [types[n] for n in types if n.endswith("weight_quantizer.codes")]
    want = onnx.TensorProto.UINT4 if int4 else onnx.TensorProto.UINT8
    assert codes.count(want) == (2 if int4 else 3)  # the 5-bit layer stays uint8 with int4
    assert not any(n.endswith(".weight") for n in types)  # no float copy of quantized weights
    assert info["int4_initialisers"] == (4 if int4 else 0)
    chk = export.check_onnx(tmp_path / "m.onnx", model, x)
    assert chk["n"] == 64 and chk["max_abs_diff"] < 0.05 and chk["top1_agreement"] >= 95.0


def test_onnx_low_bit_activations_are_clipped(tmp_path, gen):
    import onnx

    x = torch.randn(32, 1, 28, 28, generator=gen)
    m = _net()
    qz.fold_bn(m, x[:4])
    qz.quantize_(m, BITS, act_bits=4)
    qz.calibrate_activations(m, [x])
    export.export_onnx(m, tmp_path / "m.onnx", x[:2])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Clip") == 2  # the two 4-bit inputs; the first input stays 8 bits
    chk = export.check_onnx(tmp_path / "m.onnx", m, x)
    assert chk["max_abs_diff"] < 0.1


def test_onnx_resnet20_fashion_mnist_agreement(tmp_path):
    """The zoo model at 3/4 bits (RTN weights, calibrated 8-bit activations) in onnxruntime
    agrees with PyTorch on ≥ 99.5 % of a 1 000-image test subset (the PTQ'd 2-4-bit demo model
    is checked on the full split by `ompq demo` / `ompq export`)."""
    from ompq import data, zoo

    fp = zoo.load("resnet20")
    test = data.fashion_mnist("test")
    calib = data.sample_batch(data.fashion_mnist("train"), 128, seed=0)
    names = [n for n, _ in qz.quantizable_layers(fp)]
    bits = {n: (3, 4)[i % 2] for i, n in enumerate(names)}
    qz.fold_bn(fp, calib[:8])
    qz.quantize_(fp, bits)
    qz.calibrate_activations(fp, [calib])
    export.export_onnx(fp, tmp_path / "r.onnx", calib[:2])
    chk = export.check_onnx(tmp_path / "r.onnx", fp, test, limit=1000)
    assert chk["n"] == 1000
    assert chk["max_abs_diff"] < 0.5, chk
    assert chk["top1_agreement"] >= 99.5, chk


def _cfg():
    from ompq.allocate import BitConfig

    return BitConfig(weight_bits={"conv1": 8, "layer1.0.conv1": 3, "fc": 4},
                     act_bits={"conv1": 8, "layer1.0.conv1": 6, "fc": 8}, importance={},
                     size_mb=0.01, bops_g=0.1, status="OPTIMAL", objective=1.0, method="ilp",
                     proxy="orm", budget={"size_mb": 0.01, "bops_g": None}, search_seconds=0.0)


def test_hawq_round_trip():
    cfg = _cfg()
    d = export.to_hawq_bit_config(cfg)
    assert d["quant_input"] == 8 and d["layer1.0.conv1"] == 3 and d["layer1.0.conv1_act"] == 6
    back = export.from_hawq_bit_config(d, layer_names=list(cfg.weight_bits))
    assert back.weight_bits == cfg.weight_bits and back.act_bits == cfg.act_bits
    # native HAWQ names through a name map; act keys name the layer whose input they quantize
    native = {"quant_input": 8, "quant_init_block_convbn": 8, "stage1.unit1.quant_act": 6,
              "stage1.unit1.quant_convbn1": 3, "quant_act_output": 8, "quant_output": 4}
    nm = {"quant_init_block_convbn": "conv1", "stage1.unit1.quant_act": "layer1.0.conv1",
          "stage1.unit1.quant_convbn1": "layer1.0.conv1", "quant_output": "fc"}
    got = export.from_hawq_bit_config(native, name_map=nm, layer_names=list(cfg.weight_bits))
    assert got.weight_bits == cfg.weight_bits and got.act_bits == cfg.act_bits
    with pytest.raises(ValueError, match="unknown"):
        export.from_hawq_bit_config({**d, "nope": 4}, layer_names=list(cfg.weight_bits))


def test_layer_json_round_trip(tmp_path):
    cfg = _cfg()
    path = export.write_layer_json(cfg, tmp_path / "bits.json")
    d = json.loads(path.read_text())
    assert d["layer1.0.conv1"] == {"w_bits": 3, "a_bits": 6}
    back = export.read_layer_json(path, layer_names=list(cfg.weight_bits))
    assert back.weight_bits == cfg.weight_bits and back.act_bits == cfg.act_bits
    with pytest.raises(ValueError, match="missing weight bits"):
        export.from_layer_json({"conv1": {"w_bits": 4}}, layer_names=list(cfg.weight_bits))
    with pytest.raises(ValueError, match="w_bits"):
        export.from_layer_json({"conv1": {"bits": 4}})
