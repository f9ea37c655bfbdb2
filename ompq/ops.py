"""Thin wrappers over the compiled `torch.ops.ompq` kernels.

Each wrapper calls the compiled op when the extension (and that op) is present and otherwise the
plain-PyTorch reference in `ompq.reference`. `HAS_EXTENSION` says whether `ompq._C` loaded.
Fake (meta) kernels for the compiled ops, and the autograd formulas of the AdaRound and Gram ops,
are registered here so the ops work with autograd and `torch.compile`; fake_quant and
lsq_fake_quant, called on every weight and activation of every PTQ/QAT step, have their autograd
in C++ (csrc/autograd.cpp).
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


def _register(op: str, fake, backward=None, setup_context=None, backward_fake=None) -> None:
    """Register the fake kernel of `ompq::<op>` (and of its backward op `ompq::<op>_backward`
    when it has one) and, when given, its autograd formula.

    fake_quant and lsq_fake_quant have their autograd in C++ (csrc/autograd.cpp: no interpreter
    time per training step) and pass no formula here."""
    torch.library.register_fake(f"ompq::{op}")(fake)
    if backward_fake is not None:
        torch.library.register_fake(f"ompq::{op}_backward")(backward_fake)
    if backward is not None:
        torch.library.register_autograd(f"ompq::{op}", backward, setup_context=setup_context)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: Optional[int] = None) -> Tensor:
    """Fake-quantize x (per-tensor when axis is None, else per-channel along axis); STE backward."""
    if _HAS_FAKE_QUANT:
        return torch.ops.ompq.fake_quant(x, scale, zero_point, qmin, qmax, axis)
    return reference.fake_quant(x, scale, zero_point, qmin, qmax, axis)


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: Optional[int] = None, grad_factor: float = 1.0) -> Tensor:
    """LSQ fake quantization with learned scale and zero point.

    The zero point is rounded (half to even) and clamped to [qmin, qmax] in the forward, as in
    torch's `_fake_quantize_learnable_per_{tensor,channel}_affine`; gradients flow to x (STE,
    zero outside the range), scale and zero_point (each multiplied by `grad_factor`).
    """
    if _HAS_LSQ:
        return torch.ops.ompq.lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor)
    return reference.lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis, grad_factor)


# --- fake_quant / lsq_fake_quant: fake (meta) kernels (autograd: csrc/autograd.cpp) -----------
_HAS_FAKE_QUANT = has_op("fake_quant") and has_op("fake_quant_backward")
_HAS_LSQ = has_op("lsq_fake_quant") and has_op("lsq_fake_quant_backward")


def _check_fq_args(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: Optional[int]) -> None:
    """Shape checks shared by the fake kernels (value checks need real data: done in C++)."""
    torch._check(qmin < qmax, lambda: f"ompq fake quant: qmin ({qmin}) must be < qmax ({qmax})")
    if axis is None:
        torch._check(scale.numel() == 1 and zero_point.numel() == 1,
                     lambda: "ompq fake quant: axis=None needs 1-element scale and zero_point")
    else:
        torch._check(-x.dim() <= axis < x.dim(),
                     lambda: f"ompq fake quant: axis {axis} out of range for {x.dim()}-d x")
        torch._check(scale.numel() == x.shape[axis] and zero_point.numel() == x.shape[axis],
                     lambda: "ompq fake quant: scale/zero_point need one element per channel")


def _fq_fake(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
             axis: Optional[int] = None) -> Tensor:
    _check_fq_args(x, scale, zero_point, qmin, qmax, axis)
    return x.new_empty(x.shape)


def _fq_backward_fake(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
                      qmax: int, axis: Optional[int] = None) -> Tensor:
    _check_fq_args(x, scale, zero_point, qmin, qmax, axis)
    return x.new_empty(x.shape)


def _lsq_fake(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
              axis: Optional[int] = None, grad_factor: float = 1.0) -> Tensor:
    _check_fq_args(x, scale, zero_point, qmin, qmax, axis)
    return x.new_empty(x.shape)


def _lsq_backward_fake(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
                       qmax: int, axis: Optional[int] = None, grad_factor: float = 1.0
                       ) -> tuple[Tensor, Tensor, Tensor]:
    _check_fq_args(x, scale, zero_point, qmin, qmax, axis)
    zdt = zero_point.dtype if zero_point.is_floating_point() else torch.float32
    return (x.new_empty(x.shape), scale.new_empty(scale.shape),
            zero_point.new_empty(zero_point.shape, dtype=zdt))


if _HAS_FAKE_QUANT:
    _register("fake_quant", _fq_fake, backward_fake=_fq_backward_fake)
if _HAS_LSQ:
    _register("lsq_fake_quant", _lsq_fake, backward_fake=_lsq_backward_fake)


def adaround_fake_quant(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int,
                        qmax: int, axis: Optional[int], soft: bool) -> Tensor:
    """AdaRound fake quantization of weights w with rounding variables v.

    `y = (clamp(floor(w/s) + h(v) + zp, qmin, qmax) - zp) · s`, h the rectified sigmoid (soft) or
    `v >= 0` (hard). Gradients: straight-through for w inside the range, `s · h'(v)` for v.
    """
    if has_op("adaround_fake_quant"):
        return torch.ops.ompq.adaround_fake_quant(w, scale, zero_point, v, qmin, qmax, axis, soft)
    return reference.adaround_fake_quant(w, scale, zero_point, v, qmin, qmax, axis, soft)


def adaround_reg(v: Tensor, beta: float) -> Tensor:
    """AdaRound rounding regulariser `Σ 1 - |2h(v) - 1|**beta` (a 0-d tensor, dtype of v)."""
    if has_op("adaround_reg"):
        return torch.ops.ompq.adaround_reg(v, beta)
    return reference.adaround_reg(v, beta)


def centered_gram(x: Tensor) -> Tensor:
    """N×N fp32 Gram of the column-centred N×D x (fp32/fp16/bf16 input, fp32 accumulation).

    x may also be N×… (flattened per sample). Raises ValueError for fewer than 2 dims or samples
    and for NaN/Inf input, TypeError for other dtypes. Differentiable with respect to x.
    """
    if has_op("centered_gram"):
        return torch.ops.ompq.centered_gram(x)
    return reference.centered_gram(x)


def centered_gram_mm(x: Tensor) -> Tensor:
    """`centered_gram` computed with the vendor GEMM (cuBLAS on CUDA, MKL/oneDNN on CPU): fp32
    products over column slices plus the exact centring correction in fp64, with a centred second
    pass when the mean is large against the spread (docs/DESIGN.md). Same result (to fp32
    rounding), checks, errors and gradient as `centered_gram`, which uses this path on CUDA for
    large inputs.
    """
    if has_op("centered_gram_mm"):
        return torch.ops.ompq.centered_gram_mm(x)
    return reference.centered_gram_mm(x)


def centered_gram_masked(x: Tensor, mask: Tensor) -> Tensor:
    """`centered_gram` of an (N, T, …) feature whose positions with `mask[i, t] == 0` (an (N, T)
    bool/0-1 tensor: padded tokens) count as 0. The compiled CPU kernel applies the mask while it
    centres each column chunk, with no masked copy of x; other devices (and no extension) use
    `reference.centered_gram_masked` (a masked copy). Inference only (no gradient)."""
    if x.device.type == "cpu" and has_op("centered_gram_masked"):
        return torch.ops.ompq.centered_gram_masked(x, mask)
    return reference.centered_gram_masked(x, mask)


# --- adaround / adaround_reg / centered_gram: fake (meta) kernels and autograd ------------------
_HAS_ADAROUND = has_op("adaround_fake_quant") and has_op("adaround_fake_quant_backward")
_HAS_ADAROUND_REG = has_op("adaround_reg") and has_op("adaround_reg_backward")
_HAS_GRAM = has_op("centered_gram")
_HAS_GRAM_MM = has_op("centered_gram_mm")


def _check_adaround_args(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int,
                         qmax: int, axis: Optional[int]) -> None:
    """Shape checks shared by the AdaRound fake kernels (value checks need data: done in C++)."""
    torch._check(v.shape == w.shape,
                 lambda: f"adaround_fake_quant: v must have the shape of w {tuple(w.shape)}")
    torch._check(qmin < qmax,
                 lambda: f"adaround_fake_quant: qmin ({qmin}) must be smaller than qmax ({qmax})")
    if axis is None:
        torch._check(scale.numel() == 1 and zero_point.numel() == 1,
                     lambda: "adaround_fake_quant: axis=None needs 1-element scale and zero_point")
    else:
        torch._check(-w.dim() <= axis < w.dim(),
                     lambda: f"adaround_fake_quant: axis {axis} out of range for {w.dim()}-D w")
        torch._check(scale.numel() == w.shape[axis] and zero_point.numel() == w.shape[axis],
                     lambda: "adaround_fake_quant: scale/zero_point need w.size(axis) elements")


def _adaround_fake(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int, qmax: int,
                   axis: Optional[int], soft: bool) -> Tensor:
    _check_adaround_args(w, scale, zero_point, v, qmin, qmax, axis)
    return w.new_empty(w.shape)


def _adaround_backward_fake(grad: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor,
                            qmin: int, qmax: int, axis: Optional[int], soft: bool
                            ) -> tuple[Tensor, Tensor]:
    _check_adaround_args(w, scale, zero_point, v, qmin, qmax, axis)
    return w.new_empty(w.shape), v.new_empty(v.shape)


def _adaround_setup_context(ctx, inputs, output) -> None:
    w, scale, zero_point, v, qmin, qmax, axis, soft = inputs
    ctx.save_for_backward(w, scale, zero_point, v)
    ctx.qargs = (qmin, qmax, axis, soft)


def _adaround_backward(ctx, grad: Tensor):
    w, scale, zero_point, v = ctx.saved_tensors
    gw, gv = torch.ops.ompq.adaround_fake_quant_backward(grad, w, scale, zero_point, v,
                                                          *ctx.qargs)
    need = ctx.needs_input_grad
    return (gw if need[0] else None, None, None, gv if need[3] else None, None, None, None, None)


def _adaround_reg_fake(v: Tensor, beta: float) -> Tensor:
    return v.new_empty(())


def _adaround_reg_backward_fake(grad: Tensor, v: Tensor, beta: float) -> Tensor:
    return v.new_empty(v.shape)


def _adaround_reg_setup_context(ctx, inputs, output) -> None:
    v, beta = inputs
    ctx.save_for_backward(v)
    ctx.beta = beta


def _adaround_reg_backward(ctx, grad: Tensor):
    (v,) = ctx.saved_tensors
    return torch.ops.ompq.adaround_reg_backward(grad, v, ctx.beta), None


def _gram_fake(x: Tensor) -> Tensor:
    torch._check(x.dim() >= 2, lambda: f"centered_gram: expected an N×D matrix, got {x.dim()}-D")
    torch._check(x.shape[0] >= 2, lambda: "centered_gram: need at least 2 samples (rows)")
    return x.new_empty((x.shape[0], x.shape[0]), dtype=torch.float32)


def _gram_setup_context(ctx, inputs, output) -> None:
    (x,) = inputs
    ctx.save_for_backward(x)


def _gram_backward(ctx, grad: Tensor):
    """d/dx of G = Xc Xcᵀ: P (grad + gradᵀ) Xc with P the centring over samples."""
    (x,) = ctx.saved_tensors
    xf = x.reshape(x.shape[0], -1).float()
    xc = xf - xf.mean(dim=0, keepdim=True)
    gx = (grad + grad.T) @ xc
    gx = gx - gx.mean(dim=0, keepdim=True)
    return gx.reshape(x.shape).to(x.dtype)


if _HAS_ADAROUND:
    _register("adaround_fake_quant", _adaround_fake, _adaround_backward, _adaround_setup_context,
              _adaround_backward_fake)
if _HAS_ADAROUND_REG:
    _register("adaround_reg", _adaround_reg_fake, _adaround_reg_backward,
              _adaround_reg_setup_context, _adaround_reg_backward_fake)
if _HAS_GRAM:
    _register("centered_gram", _gram_fake, _gram_backward, _gram_setup_context)
if _HAS_GRAM_MM:
    _register("centered_gram_mm", _gram_fake, _gram_backward, _gram_setup_context)
if has_op("centered_gram_masked"):
    torch.library.register_fake("ompq::centered_gram_masked")(
        lambda x, mask: _gram_fake(x))


# --- packed low-bit weights: pack_rows, unpack_rows, packed_linear (inference only) ------------
_HAS_PACK_ROWS = has_op("pack_rows")
_HAS_UNPACK_ROWS = has_op("unpack_rows")
_HAS_PACKED_LINEAR = has_op("packed_linear")


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes [rows, K] (integers in [0, 2**bits − 1], bits in 2..8) into uint8
    [rows, ceil(K/8)·bits], the packed runtime layout of docs/DESIGN.md."""
    if _HAS_PACK_ROWS:
        return torch.ops.ompq.pack_rows(codes, bits)
    return reference.pack_rows(codes, bits)


def unpack_rows(packed: Tensor, bits: int, in_features: int, scale: Tensor, offset: Tensor,
                out: Tensor) -> None:
    """Write the float32 weight `(u − offset)·scale` [rows, in_features] into `out` (contiguous,
    out.size(0) = rows, rows·in_features elements: a conv weight's shape works)."""
    if _HAS_UNPACK_ROWS:
        torch.ops.ompq.unpack_rows(packed, bits, in_features, scale, offset, out)
    else:
        reference.unpack_rows(packed, bits, in_features, scale, offset, out)


def packed_linear(x: Tensor, packed: Tensor, bits: int, in_features: int, scale: Tensor,
                  offset: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`x @ w.T + bias` for float32 x [..., in_features] and the packed weight
    w = (u − offset)·scale (per-row float32 scale, offset); float32 [..., rows], fp32
    accumulation. No autograd (inference)."""
    if _HAS_PACKED_LINEAR:
        return torch.ops.ompq.packed_linear(x, packed, bits, in_features, scale, offset, bias)
    return reference.packed_linear(x, packed, bits, in_features, scale, offset, bias)


def _check_packed_fake(op: str, packed: Tensor, bits: int, in_features: int, scale: Tensor,
                       offset: Tensor) -> None:
    """Shape checks of the packed-op fake kernels (the kernels check everything)."""
    torch._check(2 <= bits <= 8, lambda: f"ompq.{op}: bits must be an integer in 2..8, got {bits}")
    torch._check(packed.dim() == 2 and packed.dtype == torch.uint8,
                 lambda: f"ompq.{op}: packed must be a 2-D uint8 tensor")
    torch._check(packed.shape[1] == reference.packed_row_bytes(in_features, bits),
                 lambda: f"ompq.{op}: packed has {packed.shape[1]} bytes per row, but "
                         f"in_features = {in_features} at {bits} bits needs "
                         f"{reference.packed_row_bytes(in_features, bits)}")
    torch._check(scale.numel() == packed.shape[0] and offset.numel() == packed.shape[0],
                 lambda: f"ompq.{op}: scale and offset need one element per packed row")


def _pack_rows_fake(codes: Tensor, bits: int) -> Tensor:
    torch._check(2 <= bits <= 8, lambda: f"ompq.pack_rows: bits must be an integer in 2..8, "
                                         f"got {bits}")
    torch._check(codes.dim() == 2, lambda: "ompq.pack_rows: codes must be 2-D")
    return codes.new_empty((codes.shape[0], reference.packed_row_bytes(codes.shape[1], bits)),
                           dtype=torch.uint8)


def _unpack_rows_fake(packed: Tensor, bits: int, in_features: int, scale: Tensor,
                      offset: Tensor, out: Tensor) -> None:
    _check_packed_fake("unpack_rows", packed, bits, in_features, scale, offset)
    torch._check(out.numel() == packed.shape[0] * in_features,
                 lambda: "ompq.unpack_rows: out needs rows x in_features elements")
    return None


def _packed_linear_fake(x: Tensor, packed: Tensor, bits: int, in_features: int, scale: Tensor,
                        offset: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _check_packed_fake("packed_linear", packed, bits, in_features, scale, offset)
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"ompq.packed_linear: x must end in in_features = {in_features}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


if _HAS_PACK_ROWS:
    _register("pack_rows", _pack_rows_fake)
if _HAS_UNPACK_ROWS:
    _register("unpack_rows", _unpack_rows_fake)
if _HAS_PACKED_LINEAR:
    _register("packed_linear", _packed_linear_fake)
