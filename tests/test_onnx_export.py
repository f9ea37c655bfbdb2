"""ONNX QDQ export (ompq.onnx_export): node counts, INT4 initialisers, Clip for narrow grids and
agreement with PyTorch in onnxruntime, atomic writes."""
from pathlib import Path

import pytest
import torch

from _helpers import ItemsDataset
from _qmodels import quantized_net
from ompq import onnx_export
from ompq.batchnorm import fold_bn
from ompq.layers import find_layers
from ompq.quantize import calibrate_activations, quantize_


@pytest.mark.parametrize("opset,int4", [(17, False), (21, True)])
def test_onnx_qdq_small(tmp_path, gen, opset, int4):
    import onnx

    x = torch.randn(64, 1, 28, 28, generator=gen)
    model = quantized_net(x)
    info = onnx_export.export_onnx(model, tmp_path / "m.onnx", x[:2], opset=opset, int4=int4)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    assert "Clip" not in ops  # 8-bit activations need no clip
    types = {t.name: t.data_type for t in proto.graph.initializer}
    codes = [types[n.input[0]] for n in proto.graph.node  # the weight DequantizeLinear inputs
             if n.op_type == "DequantizeLinear" and n.input[0] in types]
    want = onnx.TensorProto.UINT4 if int4 else onnx.TensorProto.UINT8
    assert codes.count(want) == (2 if int4 else 3)  # the 5-bit layer stays uint8 with int4
    assert not any(n.endswith(".weight") for n in types)  # no float copy of quantized weights
    assert info["int4_initialisers"] == (4 if int4 else 0)
    chk = onnx_export.check_onnx(tmp_path / "m.onnx", model, x)
    assert chk["n"] == 64 and chk["max_abs_diff"] < 0.05 and chk["top1_agreement"] >= 95.0


def test_onnx_low_bit_activations_are_clipped(tmp_path, gen):
    import onnx

    x = torch.randn(32, 1, 28, 28, generator=gen)
    m = quantized_net(x, act_bits=4)
    onnx_export.export_onnx(m, tmp_path / "m.onnx", x[:2])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Clip") == 2  # the two 4-bit inputs; the first input stays 8 bits
    chk = onnx_export.check_onnx(tmp_path / "m.onnx", m, x)
    assert chk["max_abs_diff"] < 0.1
    # a Dataset of (x, y) items and a tensor give the same batches (first `limit` samples)
    a = onnx_export.check_onnx(tmp_path / "m.onnx", m, ItemsDataset(x), limit=10, batch_size=4)
    b = onnx_export.check_onnx(tmp_path / "m.onnx", m, x, limit=10, batch_size=4)
    assert a["n"] == b["n"] == 10 and a["max_abs_diff"] == b["max_abs_diff"]


def test_onnx_resnet20_fashion_mnist_agreement(tmp_path):
    """The zoo model at 3/4 bits (RTN weights, calibrated 8-bit activations) in onnxruntime
    agrees with PyTorch on ≥ 99.5 % of a 1 000-image test subset (the PTQ'd 2-4-bit demo model
    is checked on the full split by `ompq demo` / `ompq export`)."""
    from ompq import data, zoo

    fp = zoo.load("resnet20")
    test = data.fashion_mnist("test")
    calib = data.sample_inputs(data.fashion_mnist("train"), 128, seed=0, strict=True)
    names = [n for n, _ in find_layers(fp)]
    bits = {n: (3, 4)[i % 2] for i, n in enumerate(names)}
    fold_bn(fp, calib[:8])
    quantize_(fp, bits)
    calibrate_activations(fp, [calib])
    onnx_export.export_onnx(fp, tmp_path / "r.onnx", calib[:2])
    chk = onnx_export.check_onnx(tmp_path / "r.onnx", fp, test, limit=1000)
    assert chk["n"] == 1000
    assert chk["max_abs_diff"] < 0.5, chk
    assert chk["top1_agreement"] >= 99.5, chk


@pytest.mark.parametrize("previous", [True, False])
def test_interrupted_export_keeps_previous_file(tmp_path, gen, monkeypatch, previous):
    """onnx.save interrupted half-way (Ctrl-C): the old .onnx stays whole, no temporary file."""
    import onnx

    x = torch.randn(8, 1, 28, 28, generator=gen)
    model = quantized_net(x)
    path = tmp_path / "m.onnx"
    if previous:
        onnx_export.export_onnx(model, path, x[:2])
    before = path.read_bytes() if previous else None
    seen = []

    def partial_save(proto, f, *args, **kwargs):
        seen.append(Path(f))
        Path(f).write_bytes(proto.SerializeToString()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", partial_save)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(model, path, x[:2])
    assert seen[0].parent == tmp_path and seen[0].suffix == ".onnx" and seen[0] != path
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.onnx"] if previous else [])
    if previous:
        assert path.read_bytes() == before
        onnx.checker.check_model(str(path))
