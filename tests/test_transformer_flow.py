"""A Hugging Face-style transformer (dict inputs, attention mask) through the whole flow."""
import pytest
import torch

import ompq
from ompq import runtime
from ompq.ptq import find_blocks
from ompq.zoo import transformer as T


def _model():
    torch.manual_seed(0)
    return T.tiny_encoder().eval()


def _data(n=64, seed=1):
    return T.tokens(n, 16, seed=seed)


def _labels(model, data):
    with torch.no_grad():
        return model(**data).argmax(-1)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_blocks_with_a_mask_argument_are_reconstruction_blocks():
    model, data = _model(), _data()
    example = {k: v[:8] for k, v in data.items()}
    assert find_blocks(model, example) == ["blocks.0", "blocks.1", "head"]
    names = ompq.find_layers(model)
    assert [n for n, _ in names][:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                        "blocks.0.fc1", "blocks.0.fc2"]


def test_profile_allocate_ptq_pack_run_export_report(tmp_path):
    pytest.importorskip("onnxruntime")
    model, data = _model(), _data()
    prof = ompq.profile(model, data, num_samples=32, batch_size=8, progress=False)
    size_mb = sum(layer.params for layer in prof.layers) * 6 / 8 / 2**20  # 6 bits on average
    cfg = ompq.allocate(prof, size_mb=size_mb, bits=(4, 6, 8))
    assert cfg.size_mb <= size_mb * (1 + 1e-9)
    res = ompq.ptq(model, cfg, data, num_samples=64, iters=30, act_iters=10, progress=False)
    assert res.blocks == ["blocks.0", "blocks.1", "head"]
    q = res.model
    with torch.no_grad():
        ref, out = model(**data), q(**data)
    assert _rel(out, ref) < 0.1  # 4–8-bit weights, 8-bit inputs

    info = ompq.packed.save_packed(q, tmp_path / "m.ompq", cfg)
    assert info.file_bytes > info.weight_bytes > 0
    back = ompq.packed.load_packed(tmp_path / "m.ompq", _model())
    packed = runtime.convert(q)
    with torch.no_grad():
        assert torch.allclose(back(**data), out, atol=1e-5)
        assert _rel(packed(**data), out) < 1e-4  # integer kernels, same codes

    onnx = ompq.onnx_export.export_onnx(q, tmp_path / "m.onnx",
                                        {k: v[:2] for k, v in data.items()})
    assert onnx["qdq_nodes"]["DequantizeLinear"] > 0
    check = ompq.onnx_export.check_onnx(tmp_path / "m.onnx", q, data, optimize=False)
    assert check["n"] == 64 and check["max_abs_diff"] < 1e-4

    top1 = ompq.evaluate(q, (data, _labels(model, data)), progress=False)["top1"]
    assert top1 > 80.0  # agreement with the float model's own predictions
    paths = ompq.report.write_report(tmp_path / "report", profile=prof, bit_config=cfg,
                                     results=[{"method": "ompq", "size_mb": cfg.size_mb,
                                               "bops_g": cfg.bops_g, "top1": top1}])
    assert paths["report.md"].read_text().count("blocks.0.attn.qkv") >= 1


def test_ptq_8_bit_keeps_the_float_predictions():
    model, data = _model(), _data(128, seed=3)
    labels = _labels(model, data)
    cfg = {n: 8 for n, _ in ompq.find_layers(model)}
    q = ompq.ptq(model, cfg, data, num_samples=64, iters=0, act_iters=0, progress=False).model
    fp = ompq.evaluate(model, (data, labels), progress=False)["top1"]
    qt = ompq.evaluate(q, (data, labels), progress=False)["top1"]
    assert fp == 100.0 and fp - qt <= 0.5 + 100.0 / 128  # at most one flip in 128


def test_qat_and_hawq_take_dict_inputs_with_labels():
    model, data = _model(), _data()
    labels = _labels(model, data)
    cfg = {n: 6 for n, _ in ompq.find_layers(model)}
    res = ompq.qat(model, cfg, (data, labels), epochs=1, batch_size=16, lr=1e-4,
                   calib_samples=32, progress=False)
    assert res.steps == 4 and torch.isfinite(torch.tensor(res.last_loss))
    prof = ompq.profile(model, data, num_samples=16, progress=False)
    cfg = ompq.allocate(prof, size_mb=sum(x.params for x in prof.layers) * 5 / 8 / 2**20,
                        bits=(4, 6, 8), proxy="hawq", model=model, data=(data, labels))
    assert set(cfg.weight_bits) == set(prof.names) and cfg.proxy == "hawq"


def test_decoder_lm_head_profiles_and_quantizes():
    torch.manual_seed(0)
    model = T.tiny_decoder().eval()
    data = _data(32)
    prof = ompq.profile(model, data, num_samples=16, batch_size=8, progress=False)
    assert prof.names[-1] == "head" and prof.layers[-1].out_shape == (16, 100)
    q = ompq.ptq(model, {n: 8 for n in prof.names}, data, num_samples=32, iters=0, act_iters=0,
                 progress=False).model
    with torch.no_grad():
        assert _rel(q(**data), model(**data)) < 0.05
