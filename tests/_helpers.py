"""Helpers shared by the op tests (imported as `_helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch


def fwd_bwd(fn, x, s, z, g, *args):
    """Forward and backward of fn on fresh leaf copies of x, s, z (the inputs are left alone);
    returns (y, grad_x, grad_scale, grad_zero_point)."""
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    z = z.detach().clone().requires_grad_()
    y = fn(x, s, z, *args)
    y.backward(g)
    return y.detach(), x.grad, s.grad, z.grad


def gram64(x: torch.Tensor) -> torch.Tensor:
    """fp64 reference Gram of the column-centred x (flattened per sample)."""
    xd = x.reshape(x.shape[0], -1).double()
    xc = xd - xd.mean(0, keepdim=True)
    return xc @ xc.T


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the largest entry of the reference."""
    return float((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
