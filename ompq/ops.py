"""Thin wrappers over the compiled `torch.ops.ompq` kernels.

Each wrapper calls the compiled op when the extension (and that op) is present and otherwise the
plain-PyTorch reference in `ompq.reference`. `HAS_EXTENSION` says whether `ompq._C` loaded.
Autograd formulas and fake (meta) kernels for the compiled ops are registered here so the ops
work with autograd and `torch.compile`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference

try:
    from . import _C  # noqa: F401  (loading registers torch.ops.ompq.*)
    HAS_EXTENSION = True
except ImportError as _err:  # pragma: no cover - depends on the build
    HAS_EXTENSION = False
    warnings.warn(
        f"ompq: compiled extension ompq._C not available ({_err}); using the slower PyTorch "
        "reference ops. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_op(name: str) -> bool:
    """True when `torch.ops.ompq.<name>` is registered by the compiled extension."""
    if not HAS_EXTENSION:
        return False
    try:
        getattr(torch.ops.ompq, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: Optional[int] = None) -> Tensor:
    """Fake-quantize x (per-tensor when axis is None, else per-channel along axis); STE backward."""
    if has_op("fake_quant"):
        return torch.ops.ompq.fake_quant(x, scale, zero_point, qmin, qmax, axis)
    return reference.fake_quant(x, scale, zero_point, qmin, qmax, axis)


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: Optional[int] = None, grad_factor: float = 1.0) -> Tensor:
    """LSQ fake quantization with learned scale and zero point."""
    if has_op("lsq_fake_quant"):
        return torch.ops.ompq.lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor)
    return reference.lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor)


def adaround_fake_quant(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int,
                        qmax: int, axis: Optional[int], soft: bool) -> Tensor:
    """AdaRound fake quantization of weights w with rounding variables v."""
    if has_op("adaround_fake_quant"):
        return torch.ops.ompq.adaround_fake_quant(w, scale, zero_point, v, qmin, qmax, axis, soft)
    return reference.adaround_fake_quant(w, scale, zero_point, v, qmin, qmax, axis, soft)


def adaround_reg(v: Tensor, beta: float) -> Tensor:
    """AdaRound rounding regulariser (scalar)."""
    if has_op("adaround_reg"):
        return torch.ops.ompq.adaround_reg(v, beta)
    return reference.adaround_reg(v, beta)


def centered_gram(x: Tensor) -> Tensor:
    """N×N fp32 Gram of the column-centred N×D x (fp32/fp16/bf16 input, fp32 accumulation)."""
    if has_op("centered_gram"):
        return torch.ops.ompq.centered_gram(x)
    return reference.centered_gram(x)
