"""Quantized layers match the fake-quant formula by hand; quantize_ errors; BN folding."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ompq.batchnorm import fold_bn
from ompq.quantize import calibrate_activations, int_weight, is_quantized, quantize_
from ompq.quantizers import ActQuantizer, WeightQuantizer


def _fq(x, s, z, qmin, qmax):
    """Fake quantization written out by hand (round half to even, as torch.round)."""
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    (nn.Conv2d(6, 6, 3, groups=6, padding=1), (2, 6, 7, 7)),
    (nn.Conv2d(4, 8, 3, groups=2), (2, 4, 7, 7)),
    (nn.Conv3d(2, 3, 3), (2, 2, 5, 5, 5)),
    (nn.Linear(12, 5), (3, 12)),
])
@pytest.mark.parametrize("bits", [3, 8])
def test_quant_layer_matches_hand_formula(conv, shape, bits):
    torch.manual_seed(0)
    x = torch.randn(shape)
    m = nn.Sequential(copy.deepcopy(conv))
    quantize_(m, {"0": bits}, weight_init="minmax")
    calibrate_activations(m, [x])
    q = m[0]
    assert is_quantized(q) and isinstance(q, type(conv))
    w = conv.weight.detach()
    wc = w.reshape(w.size(0), -1)
    lo = wc.min(1).values.clamp(max=0)
    hi = wc.max(1).values.clamp(min=0)
    s = (hi - lo) / (2 ** bits - 1)
    z = torch.clamp(torch.round(-lo / s), 0, 2 ** bits - 1)
    shp = [-1] + [1] * (w.dim() - 1)
    wq = _fq(w, s.reshape(shp), z.reshape(shp), 0, 2 ** bits - 1)
    # first layer input: 8 bits, asymmetric (input has negative values)
    xs = (x.max() - x.min()) / 255
    xz = torch.round(-x.min() / xs)
    xq = _fq(x, xs, xz, 0, 255)
    if isinstance(conv, nn.Linear):
        ref = F.linear(xq, wq, conv.bias)
    else:
        ref = conv._conv_forward(xq, wq, conv.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    ints = int_weight(q)
    assert ints.dtype == torch.int32 and ints.min() >= 0 and ints.max() <= 2 ** bits - 1
    deq = (ints.float() - z.reshape(shp)) * s.reshape(shp)
    torch.testing.assert_close(deq, wq, rtol=1e-5, atol=1e-6)


def test_symmetric_weight_scale_and_mse_init():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    w[0, 0, 0, 0] = 8.0  # an outlier: MSE clipping should beat min-max
    sym = WeightQuantizer(4, 8, symmetric=True)
    sym.init_scale(w, "minmax")
    torch.testing.assert_close(sym.scale.detach(), w.abs().reshape(8, -1).max(1).values / 7)
    assert (sym.qmin, sym.qmax) == (-8, 7)
    errs = {}
    for init in ("minmax", "percentile", "mse"):
        wq = WeightQuantizer(3, 8)
        wq.init_scale(w, init)
        errs[init] = float((wq(w) - w).pow(2).sum())
    assert errs["mse"] <= errs["minmax"] + 1e-9


def test_act_quantizer_ema_and_unsigned():
    aq = ActQuantizer(4)
    aq.observing = True
    a, b = torch.rand(10) * 2, torch.rand(10) * 6
    aq(a)
    aq(b)
    expected = 0.99 * a.max() + 0.01 * b.max()
    torch.testing.assert_close(aq.running_max, expected.reshape(1))
    aq.freeze()
    assert aq.unsigned and (aq.qmin, aq.qmax) == (0, 15) and float(aq.zero_point) == 0
    x = torch.rand(7) * 3
    torch.testing.assert_close(aq(x), _fq(x, aq.scale.detach(), 0.0, 0, 15))
    lsq = ActQuantizer(4, mode="lsq")
    lsq.observing = True
    lsq(torch.randn(50))
    lsq.freeze()
    assert not lsq.unsigned
    lsq(torch.randn(50)).sum().backward()
    assert lsq.scale.grad is not None


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_bitconfig_errors_name_layers():
    with pytest.raises(ValueError, match=r"does not have: \['9'\]"):
        quantize_(_net(), {"0": 4, "3": 4, "9": 4})
    with pytest.raises(ValueError, match=r"missing from the bit_config: \['3'\]"):
        quantize_(_net(), {"0": 4})
    m = quantize_(_net(), {"0": 4}, skip=["3"])
    assert is_quantized(m[0]) and not is_quantized(m[3]) and type(m[3]) is nn.Linear
    with pytest.raises(ValueError, match="bit-width 1 is not an integer in 2..16"):
        quantize_(_net(), {"0": 1, "3": 4})


class _Split(nn.Module):
    """Conv in one submodule, its BN in another (not siblings), plus a conv whose output is
    used twice (must not be folded)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False))
        self.b = nn.ModuleDict({"bn": nn.BatchNorm2d(4)})
        self.c = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b["bn"](self.a(x)))
        z = self.c(y)
        return self.d(self.bn2(z)) + self.d(z)


def test_fold_bn_traces_non_siblings():
    torch.manual_seed(0)
    m = _Split()
    for bn in (m.b["bn"], m.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    m.eval()
    x = torch.randn(3, 2, 8, 8)
    ref = m(x)
    pairs = fold_bn(m, x)
    assert pairs == [("a.0", "b.bn")]
    assert isinstance(m.b["bn"], nn.Identity) and isinstance(m.bn2, nn.BatchNorm2d)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
