"""Plain-PyTorch reference implementations of every compiled ompq op.

These define the semantics the C++/CUDA kernels must match (see docs/DESIGN.md), are used by the
tests as the ground truth, and are the fallback when the compiled extension is missing. They are
written for clarity, not speed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def _bcast(p: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Shape a per-tensor (1 element) or per-channel parameter to broadcast against x."""
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _reduce_to(g: Tensor, x: Tensor, axis: Optional[int], like: Tensor) -> Tensor:
    if axis is None:
        return g.sum().reshape(like.shape)
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return g.sum(dim=dims).reshape(like.shape) if dims else g.reshape(like.shape)


def quantize_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                 axis: Optional[int] = None) -> Tensor:
    """Integer grid values `clamp(round_half_even(x * (1/scale)) + zp, qmin, qmax)` (as float)."""
    s = _bcast(scale, x, axis)
    z = _bcast(zero_point, x, axis)
    inv = 1.0 / s
    return torch.clamp(torch.round(x * inv) + z, qmin, qmax)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s = _bcast(scale, x, axis)
        z = _bcast(zero_point, x, axis)
        xq = torch.round(x * (1.0 / s)) + z
        mask = (xq >= qmin) & (xq <= qmax)
        ctx.save_for_backward(mask)
        return (torch.clamp(xq, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: Optional[int] = None) -> Tensor:
    """Fake quantization with a straight-through gradient for x (zero outside [qmin, qmax])."""
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):
        zp = torch.clamp(torch.round(zero_point), qmin, qmax)
        s = _bcast(scale, x, axis)
        z = _bcast(zp, x, axis)
        inv = 1.0 / s
        xq = torch.round(x * inv) + z
        ctx.save_for_backward(x, scale, zp)
        ctx.args = (qmin, qmax, axis, grad_factor)
        return (torch.clamp(xq, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        x, scale, zp = ctx.saved_tensors
        qmin, qmax, axis, grad_factor = ctx.args
        s = _bcast(scale, x, axis)
        z = _bcast(zp, x, axis)
        inv = 1.0 / s
        xq = torch.round(x * inv) + z
        low = xq < qmin
        high = xq > qmax
        inside = ~(low | high)
        gx = grad * inside
        gs = torch.where(low, (qmin - z) + torch.zeros_like(x),
                         torch.where(high, (qmax - z) + torch.zeros_like(x), (xq - z) - x * inv))
        gs = _reduce_to(grad * gs * grad_factor, x, axis, scale)
        gz = torch.where(inside, torch.zeros_like(x), -s + torch.zeros_like(x))
        gz = _reduce_to(grad * gz * grad_factor, x, axis, zp)
        return gx, gs, gz, None, None, None, None


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: Optional[int] = None, grad_factor: float = 1.0) -> Tensor:
    """LSQ fake quantization with gradients for x, scale and zero_point (as torch's learnable op)."""
    return _LSQ.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)


def adaround_h(v: Tensor) -> Tensor:
    """AdaRound's rectified sigmoid h(V) in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def adaround_fake_quant(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int,
                        qmax: int, axis: Optional[int], soft: bool) -> Tensor:
    """AdaRound fake quantization: floor(w/s) plus a learned rounding h(V) (soft) or V >= 0 (hard)."""
    s = _bcast(scale, w, axis)
    z = _bcast(zero_point, w, axis)
    h = adaround_h(v) if soft else (v >= 0).to(w.dtype)
    q = torch.clamp(torch.floor(w / s) + h + z, qmin, qmax)
    return (q - z) * s


def adaround_reg(v: Tensor, beta: float) -> Tensor:
    """AdaRound rounding regulariser `sum(1 - |2 h(V) - 1| ** beta)` (a scalar)."""
    return (1 - (2 * adaround_h(v) - 1).abs().pow(beta)).sum()


def centered_gram(x: Tensor) -> Tensor:
    """N×N fp32 Gram of the column-centred N×D matrix x."""
    xf = x.float()
    xc = xf - xf.mean(dim=0, keepdim=True)
    return xc @ xc.T
