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
    return _clamp_nan_low(torch.round(x * inv) + z, qmin, qmax)


def _clamp_nan_low(q: Tensor, qmin: int, qmax: int) -> Tensor:
    """clamp(q, qmin, qmax) with NaN mapped to qmin (torch's fake-quant kernels do the same)."""
    return torch.clamp(torch.where(torch.isnan(q), torch.full_like(q, qmin), q), qmin, qmax)


def _fq_params(x: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]):
    """(scale, 1/scale, zero point) in x's compute dtype, shaped to broadcast against x.

    Like torch's kernels, the inverse scale is computed in float32 (`1.0f / scale`); float64 x
    is computed in float64.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = _bcast(scale.detach().to(torch.float32), x, axis).to(dt)
    z = _bcast(zero_point.detach().to(torch.float32), x, axis).to(dt)
    inv = (1.0 / scale.detach().to(torch.float32)).to(dt)
    return s, _bcast(inv, x, axis), z


class _FakeQuantSTE(torch.autograd.Function):
    # Semantics of torch.fake_quantize_per_{tensor,channel}_affine (see csrc/cpu/fake_quant.cpp):
    # q = clamp(nearbyint(x * inv) + zp, qmin, qmax) with NaN -> qmin, +-Inf saturating;
    # y = (q - zp) * scale; grad_x = grad * (qmin <= nearbyint(x * inv) + zp <= qmax).
    # float16/bfloat16 are computed in float32 and rounded once at the end.
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s, inv, z = _fq_params(x, scale, zero_point, axis)
        xc = x.to(s.dtype)
        xq = torch.round(xc * inv) + z
        mask = (xq >= qmin) & (xq <= qmax)
        ctx.save_for_backward(mask)
        return ((_clamp_nan_low(xq, qmin, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None, None, None, None


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: Optional[int] = None) -> Tensor:
    """Fake quantization with a straight-through gradient for x (zero outside [qmin, qmax])."""
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis)


class _LSQ(torch.autograd.Function):
    # torch._fake_quantize_learnable_per_{tensor,channel}_affine: the zero point is rounded (half
    # to even) and clamped; the backward recomputes xq = nearbyint(zp + x * inv) (torch's order)
    # and applies LSQ's gradients element by element in torch's operation order:
    #   inside: grad_x = g, grad_s = ((g * ((clamp(xq) - zp) * s - x)) * inv) * gf, grad_zp = 0
    #   below (or NaN): grad_x = 0, grad_s = (g * (qmin - zp)) * gf, grad_zp = ((g * -1) * s) * gf
    #   above:          grad_x = 0, grad_s = (g * (qmax - zp)) * gf, grad_zp = ((g * -1) * s) * gf
    # summed over everything but the channel axis. torch's per-tensor backward rounds the zero
    # point as trunc(zp + 0.5) instead (a different value for negative or .5 zero points, i.e.
    # inconsistent with its own forward); we use the forward's zero point everywhere, which is
    # what torch's per-channel op does.
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):
        zp = torch.clamp(torch.round(zero_point.detach().to(torch.float32)), qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point, zp)
        ctx.args = (qmin, qmax, axis, grad_factor)
        s, inv, z = _fq_params(x, scale, zp, axis)
        xq = torch.round(x.to(s.dtype) * inv) + z
        return ((_clamp_nan_low(xq, qmin, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, zp = ctx.saved_tensors
        qmin, qmax, axis, grad_factor = ctx.args
        s, inv, z = _fq_params(x, scale, zp, axis)
        xc = x.to(s.dtype)
        g = grad.to(s.dtype)
        gf = float(torch.tensor(grad_factor, dtype=torch.float32)) if s.dtype == torch.float32 \
            else float(grad_factor)
        xq = torch.round(z + xc * inv)
        inside = (xq >= qmin) & (xq <= qmax)
        high = xq > qmax
        gx = (g * inside.to(g.dtype)).to(x.dtype)
        xfq = (torch.clamp(xq, qmin, qmax) - z) * s
        gs_in = ((g * (xfq - xc)) * inv) * gf
        gs_out = (g * torch.where(high, qmax - z, qmin - z)) * gf
        gs = torch.where(inside, gs_in, gs_out)
        gz = torch.where(inside, torch.zeros_like(g), ((g * -1.0) * s) * gf)
        need = ctx.needs_input_grad
        gs = _reduce_to(gs.double(), x, axis, scale).to(scale.dtype) if need[1] else None
        gz = _reduce_to(gz.double(), x, axis, zero_point).to(zero_point.dtype) \
            if need[2] else None
        return (gx if need[0] else None), gs, gz, None, None, None, None


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: Optional[int] = None, grad_factor: float = 1.0) -> Tensor:
    """LSQ fake quantization with gradients for x, scale and zero_point (as torch's learnable op)."""
    return _LSQ.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)


def adaround_h(v: Tensor) -> Tensor:
    """AdaRound's rectified sigmoid h(V) in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def _adaround_t(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, axis: Optional[int],
                soft: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Unclamped grid value `t = floor(w/s) + h + zp` and the broadcast scale and zero point."""
    s = _bcast(scale, w, axis)
    z = _bcast(zero_point, w, axis)
    h = adaround_h(v) if soft else (v >= 0).to(w.dtype)
    return torch.floor(w / s) + h + z, s, z


def adaround_fake_quant_backward(grad: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor,
                                 v: Tensor, qmin: int, qmax: int, axis: Optional[int],
                                 soft: bool) -> tuple[Tensor, Tensor]:
    """Gradients (for w, for v) of `adaround_fake_quant`.

    w gets the straight-through gradient inside `[qmin, qmax]` (zero outside); v gets
    `grad · s · h'(v)` inside the range when `soft` (the rectified sigmoid's derivative, zero where
    the clamp of h is active) and zero in hard mode.
    """
    with torch.no_grad():
        t, s, _ = _adaround_t(w, scale, zero_point, v, axis, soft)
        gw = grad * ((t >= qmin) & (t <= qmax)).to(grad.dtype)
        if not soft:
            return gw, torch.zeros_like(v)
        sig = torch.sigmoid(v)
        raw = sig * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA
        dh = ((raw >= 0) & (raw <= 1)).to(v.dtype) * (ADAROUND_ZETA - ADAROUND_GAMMA) * sig * (1 - sig)
        return gw, gw * s * dh


class _AdaRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero_point, v, qmin, qmax, axis, soft):
        ctx.save_for_backward(w, scale, zero_point, v)
        ctx.args = (qmin, qmax, axis, soft)
        t, s, z = _adaround_t(w, scale, zero_point, v, axis, soft)
        return (torch.clamp(t, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        w, scale, zero_point, v = ctx.saved_tensors
        gw, gv = adaround_fake_quant_backward(grad, w, scale, zero_point, v, *ctx.args)
        return gw, None, None, gv, None, None, None, None


def adaround_fake_quant(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int,
                        qmax: int, axis: Optional[int], soft: bool) -> Tensor:
    """AdaRound fake quantization: floor(w/s) plus a learned rounding h(V) (soft) or V >= 0 (hard).

    `y = (clamp(floor(w/s) + h + zp, qmin, qmax) - zp) · s`. Gradients: straight-through for w
    inside the range, `s · h'(V)` for V (soft mode only); scale and zero_point get none.
    """
    return _AdaRound.apply(w, scale, zero_point, v, qmin, qmax, axis, soft)


def adaround_reg_backward(grad: Tensor, v: Tensor, beta: float) -> Tensor:
    """Gradient for v of `adaround_reg`: `-grad · β |u|^(β-1) sign(u) · 2 h'(v)`, u = 2h(v) - 1."""
    with torch.no_grad():
        sig = torch.sigmoid(v)
        raw = sig * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA
        dh = ((raw >= 0) & (raw <= 1)).to(v.dtype) * (ADAROUND_ZETA - ADAROUND_GAMMA) * sig * (1 - sig)
        u = 2 * torch.clamp(raw, 0, 1) - 1
        d = -2.0 * grad * beta * u.abs().pow(beta - 1) * torch.sign(u) * dh
        return torch.where(u == 0, torch.zeros_like(d), d)


def adaround_reg(v: Tensor, beta: float) -> Tensor:
    """AdaRound rounding regulariser `sum(1 - |2 h(V) - 1| ** beta)` (a scalar)."""
    return (1 - (2 * adaround_h(v) - 1).abs().pow(beta)).sum()


def _check_gram_input(x: Tensor) -> None:
    """The input checks of the compiled `centered_gram` (same exception types and messages)."""
    if x.dim() < 2:
        raise ValueError(f"centered_gram: expected an N×D matrix (N samples along dim 0, features "
                         f"flattened), got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"centered_gram: need at least 2 samples (rows) to centre, got N = "
                         f"{x.shape[0]}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"centered_gram: unsupported dtype {x.dtype}; expected float32, float16 "
                        f"or bfloat16 (convert with .float())")


def centered_gram(x: Tensor) -> Tensor:
    """N×N fp32 Gram `(x - x.mean(0)) @ (x - x.mean(0)).T` of the column-centred N×D matrix x.

    x may be N×… (features flattened per sample). Raises ValueError for fewer than 2 dims or
    samples and for NaN/Inf input, TypeError for dtypes other than float32/float16/bfloat16.
    """
    _check_gram_input(x)
    xf = x.reshape(x.shape[0], -1).float()
    xc = xf - xf.mean(dim=0, keepdim=True)
    g = xc @ xc.T
    if not bool(torch.isfinite(g).all()):
        raise ValueError("centered_gram: the input contains NaN or Inf (or values so large that "
                         "the fp32 Gram overflows); clean or rescale the features first")
    return g


def centered_gram_masked(x: Tensor, mask: Tensor) -> Tensor:
    """`centered_gram` of the (N, T, …) feature x with x[i, t] set to 0 where mask[i, t] is 0
    (the compiled `centered_gram_masked`, with a masked copy). Same checks as `centered_gram`,
    and ValueError for a mask that is not (N, T)."""
    if x.dim() < 3:
        raise ValueError(f"centered_gram_masked: expected an (N, T, ...) feature, got shape "
                         f"{tuple(x.shape)}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"centered_gram_masked: the mask must be (N, T) = {tuple(x.shape[:2])} "
                         f"like the feature's first two dims, got {tuple(mask.shape)}")
    keep = (mask != 0).to(x.device).reshape(tuple(mask.shape) + (1,) * (x.dim() - 2))
    return centered_gram(x.masked_fill(~keep, 0))


def centered_gram_mm(x: Tensor) -> Tensor:
    """The GEMM formulation of `centered_gram` (what the compiled `centered_gram_mm` computes).

    For any constant row r, Y = x - r has the centred Gram of x, equal to P (Y Yᵀ) P with
    P = I - 11ᵀ/N, i.e. G - a1ᵀ - 1aᵀ + c with G = Y Yᵀ, a = G1/N, c = 1ᵀG1/N². Here r is the
    fp32 column mean (so the fp32 product does not cancel) and the correction runs in fp64. Same
    checks and exceptions as `centered_gram`.
    """
    _check_gram_input(x)
    xf = x.reshape(x.shape[0], -1).float()
    y = xf - xf.mean(dim=0, keepdim=True)
    g = (y @ y.T).double()
    g = (g + g.T) * 0.5
    b = g.mean(dim=1, keepdim=True) - 0.5 * g.mean()
    gc = (g - (b + b.T)).float()
    if not bool(torch.isfinite(gc).all()):
        raise ValueError("centered_gram: the input contains NaN or Inf (or values so large that "
                         "the fp32 Gram overflows); clean or rescale the features first")
    return gc


# --- packed low-bit weights (pack_rows, unpack_rows, packed_linear) ------------------------------
# Layout (docs/DESIGN.md, "Packed runtime layout"): row r holds K = in_features codes
# u in [0, 2**b - 1] zero-padded to K8 = ceil(K/8)·8; every 8 consecutive codes form a group of b
# bytes, code j at bits [j·b, (j+1)·b) of the little-endian b-byte integer; uint8 [rows, K8·b/8].
# Weight: w[r, k] = scale[r] · (u[r, k] − offset[r]). The checks raise the C++ kernels' messages.

def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row: `ceil(in_features / 8) · bits`."""
    return (in_features + 7) // 8 * bits


def _check_bits(op: str, bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"ompq.{op}: bits must be an integer in 2..8, got {bits}")


def _check_packed(op: str, packed: Tensor, bits: int, in_features: int, scale: Tensor,
                  offset: Tensor) -> int:
    """The C++ `packed::check_packed` (same order, types and messages); returns the row count."""
    _check_bits(op, bits)
    if in_features < 0:
        raise ValueError(f"ompq.{op}: in_features must be >= 0, got {in_features}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"ompq.{op}: packed must be a uint8 tensor (the packed codes), got "
                        f"{_c10_dtype(packed.dtype)}")
    if packed.dim() != 2:
        raise ValueError(f"ompq.{op}: packed must be 2-D [out_rows, bytes_per_row], got a "
                         f"{packed.dim()}-D tensor of shape {list(packed.shape)}")
    rows, rb = packed.shape[0], packed_row_bytes(in_features, bits)
    if packed.shape[1] != rb:
        raise ValueError(f"ompq.{op}: packed has {packed.shape[1]} bytes per row, but "
                         f"in_features = {in_features} at {bits} bits needs ceil({in_features} "
                         f"/ 8) * {bits} = {rb} bytes per row; pack the weight with "
                         f"pack_rows(codes, {bits})")
    if not packed.is_contiguous():
        raise ValueError(f"ompq.{op}: packed must be contiguous (rows of {rb} bytes back to "
                         "back); call .contiguous() once when building the layer")
    for name, t in (("scale", scale), ("offset", offset)):
        if t.dtype != torch.float32:
            raise TypeError(f"ompq.{op}: {name} must be float32, got {_c10_dtype(t.dtype)}")
    if scale.numel() != rows:
        raise ValueError(f"ompq.{op}: scale has {scale.numel()} elements but packed has {rows} "
                         "rows (one scale per output row)")
    if offset.numel() != rows:
        raise ValueError(f"ompq.{op}: offset has {offset.numel()} elements but packed has "
                         f"{rows} rows (one offset = zero_point - qmin per output row)")
    if scale.device != packed.device or offset.device != packed.device:
        raise ValueError(f"ompq.{op}: scale ({scale.device}) and offset ({offset.device}) must "
                         f"be on the device of packed ({packed.device})")
    return rows


def _c10_dtype(dtype: torch.dtype) -> str:
    """The dtype as C++ prints it in the kernels' messages (Float, Double, Byte, Int, Long...)."""
    names = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
             torch.bfloat16: "BFloat16", torch.uint8: "Byte", torch.int8: "Char",
             torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool"}
    return names.get(dtype, str(dtype).replace("torch.", ""))


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """The int64 codes [rows, in_features] of a packed tensor (no checks; any device)."""
    rows = packed.shape[0]
    groups = packed.shape[1] // bits
    dev = packed.device
    b = packed.reshape(rows, groups, bits).to(torch.int64)
    word = (b << (8 * torch.arange(bits, device=dev))).sum(-1)
    codes = (word[..., None] >> (bits * torch.arange(8, device=dev))) & (2 ** bits - 1)
    return codes.reshape(rows, groups * 8)[:, :in_features]


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes [rows, K] (integers in [0, 2**bits − 1]) into uint8
    [rows, ceil(K/8)·bits] (layout above). Raises ValueError for bits outside 2..8 or a code out
    of range (naming it and its position), TypeError for non-integer codes."""
    _check_bits("pack_rows", bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError("ompq.pack_rows: codes must be an integer tensor (uint8, int32 or "
                        f"int64), got {_c10_dtype(codes.dtype)}")
    if codes.dim() != 2:
        raise ValueError(f"ompq.pack_rows: codes must be 2-D [out_rows, in_features], got a "
                         f"{codes.dim()}-D tensor of shape {list(codes.shape)}")
    c = codes.to(torch.int64)
    maxv = 2 ** bits - 1
    bad = (c < 0) | (c > maxv)
    if bool(bad.any()):
        r, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"ompq.pack_rows: codes must lie in [0, {maxv}] for {bits} bits "
                         f"(u = q - qmin), got {int(c[r, k])} at [{r}, {k}]")
    rows, k = c.shape
    groups = (k + 7) // 8
    dev = c.device
    c = torch.nn.functional.pad(c, (0, groups * 8 - k)).reshape(rows, groups, 8)
    word = (c << (bits * torch.arange(8, device=dev))).sum(-1)
    out = (word[..., None] >> (8 * torch.arange(bits, device=dev))) & 255
    return out.to(torch.uint8).reshape(rows, groups * bits)


def dequantize_rows(packed: Tensor, bits: int, in_features: int, scale: Tensor,
                    offset: Tensor) -> Tensor:
    """The float32 weight [rows, in_features] `(u − offset) · scale` of a packed tensor."""
    _check_packed("unpack_rows", packed, bits, in_features, scale, offset)
    u = unpack_codes(packed, bits, in_features).to(torch.float32)
    return (u - offset.reshape(-1, 1)) * scale.reshape(-1, 1)


def unpack_rows(packed: Tensor, bits: int, in_features: int, scale: Tensor, offset: Tensor,
                out: Tensor) -> None:
    """Write the dequantized float32 weight `(u − offset) · scale` ([rows, in_features]) into
    `out`: float32, contiguous, out.size(0) = rows and rows·in_features elements (any trailing
    shape, e.g. a conv weight's)."""
    rows = _check_packed("unpack_rows", packed, bits, in_features, scale, offset)
    if out.dtype != torch.float32:
        raise TypeError(f"ompq.unpack_rows: out must be float32, got {_c10_dtype(out.dtype)}")
    if out.dim() < 1 or out.shape[0] != rows or out.numel() != rows * in_features:
        raise ValueError(f"ompq.unpack_rows: out has shape {list(out.shape)} but the weight is "
                         f"{rows} x {in_features} (out.size(0) must be {rows} and out.numel() "
                         f"{rows * in_features})")
    if not out.is_contiguous():
        raise ValueError("ompq.unpack_rows: out must be contiguous")
    if out.device != packed.device:
        raise ValueError(f"ompq.unpack_rows: out is on {out.device} but packed is on "
                         f"{packed.device}")
    with torch.no_grad():
        out.copy_(dequantize_rows(packed, bits, in_features, scale, offset).reshape(out.shape))


def packed_linear(x: Tensor, packed: Tensor, bits: int, in_features: int, scale: Tensor,
                  offset: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`x @ w.T + bias` with the packed weight w = (u − offset)·scale: x float32 [..., K] →
    float32 [..., rows]."""
    op = "packed_linear"
    rows = _check_packed(op, packed, bits, in_features, scale, offset)
    if bias is not None:
        if bias.dtype != torch.float32:
            raise TypeError(f"ompq.{op}: bias must be float32, got {_c10_dtype(bias.dtype)}")
        if bias.numel() != rows:
            raise ValueError(f"ompq.{op}: bias has {bias.numel()} elements but packed has "
                             f"{rows} rows (one bias per output row)")
        if bias.device != packed.device:
            raise ValueError(f"ompq.{op}: bias is on {bias.device} but packed is on "
                             f"{packed.device}")
    if x.dtype != torch.float32:
        raise TypeError(f"ompq.{op}: x must be float32, got {_c10_dtype(x.dtype)} (convert "
                        "with .float())")
    if x.dim() < 1:
        raise ValueError(f"ompq.{op}: x must have at least 1 dimension, got a 0-D tensor")
    if x.shape[-1] != in_features:
        raise ValueError(f"ompq.{op}: x has {x.shape[-1]} features in its last dimension "
                         f"(shape {list(x.shape)}) but in_features = {in_features}")
    if x.device != packed.device:
        raise ValueError(f"ompq.{op}: x is on {x.device} but packed is on {packed.device}; put "
                         "all tensors on one device")
    w = dequantize_rows(packed, bits, in_features, scale, offset)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.reshape(-1))
