"""quantize_ keeps each module: subclasses with their own forward, tied weights, the whole flow."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ompq
from ompq.layers import find_layers
from ompq.quantize import (QuantScheme, act_quantizer, float_weight, is_quantized, quant_layers,
                           quantize_, weight_quantizer)


class Conv2dSame(nn.Conv2d):
    """TF-style "same" padding computed in forward (as timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward (a fixed output scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.linear(x, self.weight, self.bias)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         Conv2dSame(8, 16, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), ScaledLinear(16, 10)).eval()


def _data(n: int = 128) -> torch.Tensor:
    return torch.randn(n, 1, 15, 15, generator=torch.Generator().manual_seed(1))


def test_subclass_forward_kept_and_8_bit_close_to_float():
    net, x = _net(), _data()
    with torch.no_grad():
        ref = net(x)
    q = ompq.ptq(net, {n: 8 for n, _ in find_layers(net)}, x, num_samples=64, iters=0,
                 act_iters=0, progress=False).model
    assert [type(m).__mro__[1] for _, m in quant_layers(q)] == [Conv2dSame, Conv2dSame,
                                                                ScaledLinear]
    out = q(x)
    assert out.shape == ref.shape == (128, 10)  # "same" padding of 15×15 at stride 2 -> 8×8 -> 4×4
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.02, rel


def test_profile_allocate_ptq_export_on_subclasses(tmp_path):
    net, x = _net(), _data()
    prof = ompq.profile(net, x, num_samples=32, progress=False)
    names = [l.name for l in prof.layers]
    assert names == ["0", "3", "7"]
    size_mb = sum(l.params for l in prof.layers) * 6 / (8 * 2 ** 20)  # 6 bits on average
    cfg = ompq.allocate(prof, size_mb=size_mb, bits=(4, 6, 8))
    q = ompq.ptq(net, cfg, x, num_samples=64, iters=5, act_iters=2, progress=False).model
    assert all(is_quantized(m) for _, m in quant_layers(q)) and len(quant_layers(q)) == 3
    info = ompq.packed.save_packed(q, tmp_path / "m.ompq", cfg)
    assert info.within(0.05)
    back = ompq.packed.load_packed(tmp_path / "m.ompq", _net())
    assert torch.equal(back(x), q(x))
    res = ompq.onnx_export.export_onnx(q, tmp_path / "m.onnx", x[:2])
    assert res["qdq_nodes"]["DequantizeLinear"] >= 3
    check = ompq.onnx_export.check_onnx(tmp_path / "m.onnx", q, x, optimize=False)
    assert check["max_abs_diff"] < 1e-4


def test_tied_weights_stay_tied():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    net = nn.Sequential(a, nn.ReLU(), b)
    quantize_(net, {"0": 4, "2": 4})
    assert float_weight(net[0]) is float_weight(net[2])
    with torch.no_grad():
        float_weight(net[0]).mul_(2.0)
    assert torch.equal(float_weight(net[2]), float_weight(net[0]))


def test_weight_is_fake_quantized_and_input_quantized_by_hook():
    lin = nn.Linear(5, 3)
    net = nn.Sequential(nn.Identity(), lin)
    quantize_(net, {"1": 2}, QuantScheme(weight_init="minmax"), quantize_input=False)
    wq = weight_quantizer(lin)
    assert wq is not None and wq.bits == 2
    assert act_quantizer(lin) is None  # first layer with quantize_input=False: float input
    assert torch.equal(lin.weight, wq(float_weight(lin)))
    assert len(torch.unique(lin.weight[0])) <= 4
    net2 = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    quantize_(net2, {"0": 8, "2": 4}, act_bits=3)
    aq = act_quantizer(net2[2])
    assert aq is not None and aq.bits == 3 and aq.observing


def test_unknown_option_and_already_parametrized_are_refused():
    with pytest.raises(TypeError, match="unknown QuantScheme option"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), {"0": 4}, weight_bits=3)
    net = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.parametrizations.weight_norm(net[0])
    with pytest.raises(ValueError, match="layer '0'.*already has a parametrization"):
        quantize_(net, {"0": 4})
