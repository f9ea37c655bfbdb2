"""A small conv net and its quantized version, shared by the packed-checkpoint and ONNX tests
(imported as `_qmodels`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from torch import nn

from ompq.batchnorm import fold_bn
from ompq.quantize import calibrate_activations, quantize_

#: weight bits of the quantizable layers of `small_net` (module names of the Sequential)
BITS = {"0": 3, "3": 2, "8": 5}


def small_net() -> nn.Module:
    """Conv-BN-ReLU, a grouped strided conv-BN-ReLU, pooling and a Linear (eval mode, seeded)."""
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


def quantized_net(x: torch.Tensor, symmetric: bool = False, act_bits=None) -> nn.Module:
    """`small_net` with BN folded, quantized to `BITS` and activations calibrated on `x`."""
    m = small_net()
    fold_bn(m, x[:4])
    quantize_(m, BITS, weight_symmetric=symmetric, act_bits=act_bits)
    calibrate_activations(m, [x])
    return m
