"""PTQ: blocks from the module tree, 8-bit near FP32, AdaRound beats nearest rounding,
determinism."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ompq.evaluate import evaluate
from ompq.ptq import find_blocks, ptq
from ompq.layers import find_layers
from ompq.quantize import float_weight, is_quantized, quant_layers, weight_quantizer


class TinyNet(nn.Module):
    """Small CNN for 14×14 Fashion-MNIST: stem, a residual block, a downsampling stage, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.res = _Res(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.down(self.res(self.stem(x))).flatten(1))


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def _small(x):
    return F.avg_pool2d(x, 2)


@functools.lru_cache(maxsize=1)
def _data():
    from ompq.data import fashion_mnist
    tr, te = fashion_mnist("train"), fashion_mnist("test")
    return ((_small(tr.tensors[0][:2000]), tr.tensors[1][:2000]),
            (_small(te.tensors[0][:1000]), te.tensors[1][:1000]))


@functools.lru_cache(maxsize=1)
def _trained():
    (x, y), _ = _data()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(3):
        perm = torch.randperm(x.size(0), generator=g)
        for i in range(0, x.size(0), 50):
            idx = perm[i:i + 50]
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


def test_find_blocks_tiny_and_zoo():
    m = TinyNet()
    assert find_blocks(m, torch.randn(2, 1, 14, 14)) == ["stem.0", "res", "down.0", "fc"]
    from ompq.zoo.models import mobilenetv2, resnet20
    r = find_blocks(resnet20(), torch.randn(2, 1, 28, 28))
    assert r[0] == "conv1" and r[-1] == "fc" and "layer2.0" in r and len(r) == 11
    mb = find_blocks(mobilenetv2(), torch.randn(2, 1, 28, 28))
    assert len(mb) >= 5 and all(not b.endswith(".conv") for b in mb)


def test_ptq_8bit_close_to_fp32():
    m = _trained()
    (x, _), test = _data()
    fp = evaluate(m, test, progress=False)["top1"]
    assert fp > 70
    q = ptq(m, {n: 8 for n, _ in find_layers(m)}, x, num_samples=256, iters=20, act_iters=10,
            progress=False).model
    assert len(quant_layers(q)) == 5
    assert abs(evaluate(q, test, progress=False)["top1"] - fp) <= 0.5


def test_adaround_beats_nearest_at_2_bits():
    # (this tiny net loses < 0.5 point at 3 bits with nearest rounding, so 2 bits is the test)
    m = _trained()
    (x, _), test = _data()
    cfg = {n: 2 for n, _ in find_layers(m)}
    rtn = ptq(m, cfg, x, num_samples=512, iters=0, act_iters=0, progress=False).model
    ada = ptq(m, cfg, x, num_samples=512, iters=300, act_iters=0, batch_size=64,
              progress=False).model
    acc_rtn = evaluate(rtn, test, progress=False)["top1"]
    acc_ada = evaluate(ada, test, progress=False)["top1"]
    assert acc_ada > acc_rtn + 5, (acc_ada, acc_rtn)
    # the learned rounding is baked into on-grid weights
    layer = dict(quant_layers(ada))["res.c1"]
    wq = weight_quantizer(layer)
    deq = (wq.int_weight(float_weight(layer)).float() - wq.zero_point.reshape(-1, 1, 1, 1)) * \
        wq.scale.detach().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(deq, float_weight(layer).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight, float_weight(layer).detach(), rtol=0, atol=1e-6)


def test_ptq_deterministic_and_input_untouched():
    m = _trained()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    (x, _), _ = _data()
    cfg = {n: 4 for n, _ in find_layers(m)}
    a = ptq(m, cfg, x, num_samples=64, iters=10, act_iters=5, seed=3, progress=False).model
    b = ptq(m, cfg, x, num_samples=64, iters=10, act_iters=5, seed=3, progress=False).model
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert is_quantized(a.stem[0]) and isinstance(a.stem[1], nn.Identity)


def test_short_calibration_warning_points_at_the_callers_line():
    from ompq.data import sample_inputs
    with pytest.warns(UserWarning, match="calibrating on all 6") as rec:
        sample_inputs([torch.randn(6, 3)], 8)
    assert rec[0].filename == __file__
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="calibrating on all 6") as rec:
        ptq(m, {"0": 8, "2": 8}, torch.randn(6, 3), num_samples=8, iters=0, act_iters=0,
            progress=False)
    assert [w.filename for w in rec if "calibrating" in str(w.message)] == [__file__]


def test_ptq_config_overrides_and_result_stats():
    import json

    from ompq.ptq import PTQConfig
    from ompq.quantize import QuantScheme

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, bits = torch.randn(32, 3), {"0": 4, "2": 4}
    cfg = PTQConfig(num_samples=16, iters=2, act_iters=1, progress=False,
                    scheme=QuantScheme(weight_init="minmax"))
    res = ptq(m, bits, x, cfg, act_iters=0)
    assert (res.iters, res.act_iters, res.blocks) == (2, 0, ["0", "2"])
    assert set(res.block_losses) == {"0", "2"}
    assert json.loads(json.dumps(res.stats()))["blocks"] == ["0", "2"]
    same = ptq(m, bits, x, num_samples=16, iters=2, act_iters=0, progress=False,
               weight_init="minmax").model
    for (k, va), vb in zip(res.model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(TypeError, match=r"unknown PTQConfig option\(s\) \['itres'\]"):
        ptq(m, bits, x, itres=3)
