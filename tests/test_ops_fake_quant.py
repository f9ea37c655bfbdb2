"""Tests of ompq's fake_quant / lsq_fake_quant ops (compiled kernels, reference, torch).

The compiled ops must equal `ompq.reference` and torch's own fake-quant ops bit for bit in the
forward and for grad_x; grad_scale / grad_zero_point are sums, equal up to summation order.

Gradients: the forward is piecewise constant in x, scale and the (rounded) zero point, so finite
differences give 0 (or a jump) where the straight-through and LSQ estimators give their defined
surrogate gradients. A numerical `torch.autograd.gradcheck` therefore runs only where the
estimators are true derivatives (all elements clipped); everywhere else every backward is checked
as a full Jacobian (float64) against the reference's autograd formulas and, in float32, against
torch's built-in autograd formulas; `torch.library.opcheck` checks the autograd/fake registrations.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ompq import ops, reference

from _helpers import fwd_bwd

OPS = torch.ops.ompq
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _compiled():
    assert ops.has_op("fake_quant") and ops.has_op("lsq_fake_quant"), \
        "compiled extension missing: pip install --no-build-isolation -e ."


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _torch_fq(x, s, z, qmin, qmax, axis):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, s, z.to(torch.int32), axis % x.dim(),
                                                  qmin, qmax)


def _torch_lsq(x, s, z, qmin, qmax, axis, gf=1.0):
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, s, z, qmin, qmax, gf)
    return torch._fake_quantize_learnable_per_channel_affine(x, s, z, axis % x.dim(), qmin,
                                                             qmax, gf)


def _sum_close(a, b, g, span):
    """grad_scale/grad_zero_point: sums equal up to summation order."""
    atol = 2e-6 * (float(g.abs().sum()) + 1.0) * span
    torch.testing.assert_close(a, b, rtol=2e-5, atol=atol)


@st.composite
def cases(draw, max_numel=1500):
    """Random shape, axis, bit width, scale (down to ~1e-6 and tiny 1e-30), zero point, x with
    exact .5 ties and very large values."""
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 7)) for _ in range(ndim)]
    big = draw(st.integers(0, ndim - 1))
    shape[big] = draw(st.integers(1, 40))  # one long dim exercises the vector path
    assume(math.prod(shape) <= max_numel)
    axis = draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1)))
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    qmin, qmax = _qrange(bits, signed)
    channels = 1 if axis is None else shape[axis]
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["pow2", "random", "tiny"]))
    if kind == "pow2":  # exact ties: scale a power of two, x = (k + 0.5) * scale
        e = torch.randint(-12, 4, (channels,), generator=gen).float()
        scale = torch.pow(2.0, e)
    elif kind == "tiny":
        scale = torch.full((channels,), 1e-30) * (1 + torch.rand(channels, generator=gen))
    else:
        scale = torch.exp(torch.empty(channels).uniform_(math.log(1e-6), math.log(10.0),
                                                         generator=gen))
    zp = torch.randint(qmin, qmax + 1, (channels,), generator=gen).float()
    sb = scale if axis is None else scale.reshape([-1 if d == axis % ndim else 1
                                                   for d in range(ndim)])
    k = torch.randint(qmin - 3 * (qmax - qmin), qmax + 3 * (qmax - qmin) + 1, shape,
                      generator=gen).float()
    ties = (k + 0.5) * sb
    noise = torch.randn(shape, generator=gen) * sb * (qmax - qmin)
    x = torch.where(torch.rand(shape, generator=gen) < 0.5, ties, noise)
    large = torch.rand(shape, generator=gen) < 0.05
    x = torch.where(large, torch.randn(shape, generator=gen) * 1e30, x)
    g = torch.randn(shape, generator=gen)
    return x.contiguous(), scale, zp, qmin, qmax, axis, g


def _near_tie(x, scale, zp, axis):
    """Elements whose zp + x * (1/scale) lies within 4 float32 ulps of a .5 tie (float64 math)."""
    shape = None if axis is None else [-1 if d == axis % x.dim() else 1 for d in range(x.dim())]
    inv = (1.0 / scale.float()).double()
    inv = inv.reshape(shape) if shape else inv.reshape(())
    z = zp.double().reshape(shape) if shape else zp.double().reshape(())
    v = z + x.double() * inv
    frac = v - torch.floor(v)
    return ((frac - 0.5).abs() <= 4 * 2.0 ** -23 * v.abs().clamp_min(1.0)) & torch.isfinite(v)


def _int64_safe(x, scale, axis):
    """torch's per-channel/learnable kernels overflow int64 for |x/scale| >= 2**63."""
    sb = scale if axis is None else scale.reshape(
        [-1 if d == axis % x.dim() else 1 for d in range(x.dim())])
    return bool(((x / sb).abs() < 2.0 ** 62).all())


# ------------------------------------------------------------------------------------------
# Forward / backward equality
# ------------------------------------------------------------------------------------------

@SETTINGS
@given(cases())
def test_fake_quant_matches_reference_and_torch(case):
    x, s, z, qmin, qmax, axis, g = case
    ours = fwd_bwd(lambda a, b, c: ops.fake_quant(a, b, c, qmin, qmax, axis), x, s, z, g)
    ref = fwd_bwd(lambda a, b, c: reference.fake_quant(a, b, c, qmin, qmax, axis), x, s, z, g)
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1], ref[1])
    if axis is None or _int64_safe(x, s, axis):
        xt = x.clone().requires_grad_()
        yt = _torch_fq(xt, s, z, qmin, qmax, axis)
        yt.backward(g)
        assert torch.equal(ours[0], yt.detach())
        assert torch.equal(ours[1], xt.grad)


@SETTINGS
@given(cases(), st.sampled_from([1.0, 0.37]))
def test_lsq_matches_reference_and_torch(case, gf):
    x, s, z, qmin, qmax, axis, g = case
    z = z + 0.3  # learnable zero points are rounded in the forward
    # Elements within float rounding of a .5 tie of the backward's nearbyint(zp + x * inv) may be
    # classified differently by the vectorised kernel and the reference: masked out (gradient 0).
    g = g * ~_near_tie(x, s, z.round().clamp(qmin, qmax), axis)
    ours = fwd_bwd(lambda a, b, c: ops.lsq_fake_quant(a, b, c, qmin, qmax, axis, gf), x, s, z, g)
    ref = fwd_bwd(lambda a, b, c: reference.lsq_fake_quant(a, b, c, qmin, qmax, axis, gf),
               x, s, z, g)
    span = qmax - qmin + 1
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1], ref[1])
    _sum_close(ours[2], ref[2], g, span)
    _sum_close(ours[3], ref[3], g, float(s.max()))
    # torch's learnable ops need qmin <= 0 <= qmax, and its per-tensor backward agrees with its
    # forward only for non-negative zero points (see reference._LSQ).
    # (torch's per-channel learnable backward also fails on 1-d x: it returns 0-d grads.)
    if qmin <= 0 <= qmax and _int64_safe(x, s, axis) and (axis is not None or z.min() >= 0) \
            and (axis is None or x.dim() > 1):
        # torch's x86 kernels are built with FMA contraction: nearbyint(fma(x, inv, zp)) can
        # round the other way than nearbyint(zp + x * inv) when the value is within float
        # rounding of a .5 tie. Such elements are masked out (their gradient set to 0).
        gt = g * ~_near_tie(x, s, z.round().clamp(qmin, qmax), axis)
        ours = fwd_bwd(lambda a, b, c: ops.lsq_fake_quant(a, b, c, qmin, qmax, axis, gf), x, s, z,
                    gt)
        tt = fwd_bwd(lambda a, b, c: _torch_lsq(a, b, c, qmin, qmax, axis, gf), x, s, z, gt)
        assert torch.equal(ours[0], tt[0])
        assert torch.equal(ours[1], tt[1])
        _sum_close(ours[2], tt[2], gt, span)
        _sum_close(ours[3], tt[3], gt, float(s.max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("axis", [None, 1])
def test_other_dtypes_match_reference(dtype, axis, gen):
    x = (torch.randn(3, 37, 5, generator=gen) * 3).to(dtype)
    c = 1 if axis is None else 37
    s = torch.rand(c, generator=gen) * 0.2 + 0.05
    z = torch.randint(0, 16, (c,), generator=gen).float()
    g = torch.randn(3, 37, 5, generator=gen).to(dtype)
    for op, ref in [(ops.fake_quant, reference.fake_quant),
                    (ops.lsq_fake_quant, reference.lsq_fake_quant)]:
        a = fwd_bwd(lambda p, q, r: op(p, q, r, 0, 15, axis), x, s, z, g)
        b = fwd_bwd(lambda p, q, r: ref(p, q, r, 0, 15, axis), x, s, z, g)
        assert a[0].dtype == dtype
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if op is ops.lsq_fake_quant:
            _sum_close(a[2], b[2], g.float(), 16)
    if dtype == torch.float16:  # torch computes half in float32 like we do
        assert torch.equal(ops.fake_quant(x, s, z, 0, 15, axis), _torch_fq(x, s, z, 0, 15, axis))


def test_noncontiguous_and_channels_last(gen):
    x = torch.randn(4, 6, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    s = torch.rand(6, generator=gen) * 0.1 + 0.01
    z = torch.zeros(6)
    y = ops.fake_quant(x, s, z, -8, 7, 1)
    assert torch.equal(y, reference.fake_quant(x.contiguous(), s, z, -8, 7, 1))
    xt = torch.randn(7, 9, generator=gen).t()
    s2 = torch.rand(7, generator=gen) + 0.1
    assert torch.equal(ops.fake_quant(xt, s2, torch.zeros(7), 0, 15, 1),
                       reference.fake_quant(xt, s2, torch.zeros(7), 0, 15, 1))


def test_empty_and_scalar_tensors():
    s, z = torch.tensor([0.5]), torch.tensor([0.0])
    assert ops.fake_quant(torch.empty(0, 3), s, z, -8, 7).shape == (0, 3)
    assert ops.fake_quant(torch.tensor(1.3), s, z, -8, 7).item() == 1.5
    gx, gs, gz = OPS.lsq_fake_quant_backward(torch.empty(0), torch.empty(0), s, z, -8, 7)
    assert gx.shape == (0,) and gs.item() == 0.0 and gz.item() == 0.0


# Tensors large enough to be cut into many parallel chunks (16 384 elements each, at most 64),
# in the layouts that store partial sums differently: a chunk spanning fewer rows than there are
# channels (axis 0 of a weight), more rows than channels (a middle axis with outer > 1, few
# channels), rows of one element (last axis) and per-tensor.
@pytest.mark.parametrize("shape,axis", [((96, 40, 3, 3), 0), ((16, 3, 40, 40), 1),
                                        ((700, 300), -1), ((300, 700), 0), ((50, 40, 40), None)])
def test_lsq_many_chunks_match_reference_and_are_deterministic(shape, axis, gen):
    x = torch.randn(shape, generator=gen) * 2
    c = 1 if axis is None else shape[axis]
    s = torch.rand(c, generator=gen) * 0.3 + 0.05
    z = torch.randint(0, 16, (c,), generator=gen).float()
    g = torch.randn(shape, generator=gen)
    ours = fwd_bwd(lambda a, b, d: ops.lsq_fake_quant(a, b, d, 0, 15, axis, 0.7), x, s, z, g)
    ref = fwd_bwd(lambda a, b, d: reference.lsq_fake_quant(a, b, d, 0, 15, axis, 0.7), x, s, z, g)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    _sum_close(ours[2], ref[2], g, 16)
    _sum_close(ours[3], ref[3], g, float(s.max()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.lsq_fake_quant_backward(g, x, s, z, 0, 15, axis, 0.7)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, (ours[1], ours[2], ours[3])))


# ------------------------------------------------------------------------------------------
# Backward as a full Jacobian (float64) against the reference's formulas
# ------------------------------------------------------------------------------------------

def _jacobian(fn, inputs):
    """Rows of the Jacobian of fn at inputs from one vjp per output element."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    rows = []
    for i in range(y.numel()):
        e = torch.zeros_like(y).reshape(-1)
        e[i] = 1
        grads = torch.autograd.grad(y, inputs, e.reshape(y.shape), retain_graph=True)
        rows.append(torch.cat([gr.reshape(-1) for gr in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_backward_jacobians_float64(axis, gen):
    x = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2)
    c = 1 if axis is None else x.shape[axis]
    s = torch.rand(c, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    z = torch.randint(0, 8, (c,), generator=gen).double()
    j_ours = _jacobian(lambda a: ops.fake_quant(a, s, z, 0, 15, axis), [x])
    j_ref = _jacobian(lambda a: reference.fake_quant(a, s, z, 0, 15, axis), [x])
    assert torch.equal(j_ours, j_ref)
    assert set(j_ours.unique().tolist()) <= {0.0, 1.0}
    j_ours = _jacobian(lambda a, b, d: ops.lsq_fake_quant(a, b, d, 0, 15, axis, 0.5), [x, s, z])
    j_ref = _jacobian(lambda a, b, d: reference.lsq_fake_quant(a, b, d, 0, 15, axis, 0.5),
                      [x, s, z])
    torch.testing.assert_close(j_ours, j_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# NaN / Inf
# ------------------------------------------------------------------------------------------

def test_nan_inf_behaviour():
    """NaN and -Inf saturate to qmin, +Inf to qmax (torch's per-tensor behaviour); all three
    get grad_x = 0; for LSQ, NaN and -Inf count as below the range, +Inf as above."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0])
    s, z, qmin, qmax = torch.tensor([0.5]), torch.tensor([3.0]), 0, 15
    want = torch.tensor([(qmin - 3) * 0.5, (qmax - 3) * 0.5, (qmin - 3) * 0.5, 1.0])
    g = torch.ones(4)
    for fn in (ops.fake_quant, reference.fake_quant, ops.lsq_fake_quant, reference.lsq_fake_quant):
        y, gx, gs, gz = fwd_bwd(lambda a, b, c: fn(a, b, c, qmin, qmax), x, s, z, g)
        assert torch.equal(y, want)
        assert torch.equal(gx, torch.tensor([0.0, 0.0, 0.0, 1.0]))
        if fn in (ops.lsq_fake_quant, reference.lsq_fake_quant):
            # below: qmin - z = -3 (NaN, -Inf); above: qmax - z = 12; inside: xq - x/s = 0
            assert gs.item() == -3 + 12 - 3 + 0
            assert gz.item() == -0.5 * 3
    # torch's per-tensor fake quant agrees on all of them
    assert torch.equal(torch.fake_quantize_per_tensor_affine(x, 0.5, 3, qmin, qmax), want)
    # per-channel: same rule along any axis
    xc = torch.stack([x, x.flip(0)])
    yc = ops.fake_quant(xc, torch.tensor([0.5, 0.25]), torch.tensor([3.0, 0.0]), qmin, qmax, 0)
    assert torch.equal(yc[0], want)
    assert torch.equal(yc[1], torch.tensor([1.0, 0.0, 15 * 0.25, 0.0]))  # 1, -Inf, +Inf, NaN


def test_nan_in_grad_propagates_like_torch():
    """grad * mask (not a select): a NaN/Inf upstream gradient stays NaN even outside the range."""
    x = torch.tensor([100.0, 0.5]).requires_grad_()
    y = ops.fake_quant(x, torch.tensor([1.0]), torch.tensor([0.0]), 0, 15)
    y.backward(torch.tensor([float("inf"), 2.0]))
    assert math.isnan(x.grad[0].item()) and x.grad[1].item() == 2.0


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_error_messages():
    x = torch.randn(2, 3, 4)
    s1, z1 = torch.tensor([0.1]), torch.tensor([0.0])
    s3, z3 = torch.full((3,), 0.1), torch.zeros(3)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        OPS.fake_quant(torch.ones(3, dtype=torch.int32), s1, z1, 0, 15)
    with pytest.raises(RuntimeError, match="scale must be a floating-point tensor"):
        OPS.fake_quant(x, torch.tensor([1]), z1, 0, 15)
    with pytest.raises(RuntimeError, match=r"qmin \(15\) must be smaller than qmax \(0\)"):
        OPS.fake_quant(x, s1, z1, 15, 0)
    with pytest.raises(RuntimeError, match=r"qmin \(3\) must be smaller than qmax \(3\)"):
        OPS.lsq_fake_quant(x, s1, z1, 3, 3)
    with pytest.raises(RuntimeError, match="at most 16 bits"):
        OPS.fake_quant(x, s1, z1, 0, 2 ** 17)
    with pytest.raises(RuntimeError, match=r"scale has 3 elements but x.size\(2\) = 4 channels"):
        OPS.fake_quant(x, s3, z3, 0, 15, 2)
    with pytest.raises(RuntimeError, match="zero_point has 1 elements"):
        OPS.fake_quant(x, s3, z1, 0, 15, 1)
    with pytest.raises(RuntimeError, match="axis=None.*1-element scale"):
        OPS.fake_quant(x, s3, z3, 0, 15)
    with pytest.raises(RuntimeError, match=r"axis 3 is out of range for x with 3 dimensions"):
        OPS.fake_quant(x, s3, z3, 0, 15, 3)
    with pytest.raises(RuntimeError, match=r"axis -4 is out of range"):
        OPS.lsq_fake_quant(x, s3, z3, 0, 15, -4)
    with pytest.raises(RuntimeError, match="scale must be positive and finite, got -0.1"):
        OPS.fake_quant(x, -s1, z1, 0, 15)
    with pytest.raises(RuntimeError, match="positive and finite, got 0 of channel 1"):
        OPS.fake_quant(x, torch.tensor([0.1, 0.0, 0.1]), z3, 0, 15, 1)
    with pytest.raises(RuntimeError, match="positive and finite, got nan"):
        OPS.lsq_fake_quant(x, torch.tensor([float("nan")]), z1, 0, 15)
    with pytest.raises(RuntimeError, match="too small"):
        OPS.fake_quant(x, torch.tensor([1e-45]), z1, 0, 15)
    with pytest.raises(RuntimeError, match=r"zero_point 20 is outside \[qmin, qmax\] = \[0, 15\]"):
        OPS.fake_quant(x, s1, torch.tensor([20.0]), 0, 15)
    with pytest.raises(RuntimeError, match="grad has shape"):
        OPS.fake_quant_backward(torch.ones(3), x, s1, z1, 0, 15)
    # lsq clamps the zero point instead of rejecting it (as torch's learnable op does)
    y = OPS.lsq_fake_quant(x, s1, torch.tensor([20.0]), 0, 15)
    assert torch.equal(y, reference.lsq_fake_quant(x, s1, torch.tensor([20.0]), 0, 15))


# ------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------

def test_opcheck(gen):
    x = torch.randn(3, 4, 5, generator=gen)
    s = (torch.rand(4, generator=gen) + 0.1).requires_grad_()
    z = torch.zeros(4).requires_grad_()
    xr = x.clone().requires_grad_()
    g = torch.randn(3, 4, 5, generator=gen)
    st_ = torch.tensor([0.2])
    zt = torch.tensor([1.0])
    checks = [
        (OPS.fake_quant.default, (xr, s.detach(), z.detach(), -8, 7, 1)),
        (OPS.fake_quant.default, (xr, st_, zt, -8, 7, None)),
        (OPS.fake_quant_backward.default, (g, x, st_, zt, -8, 7, None)),
        (OPS.lsq_fake_quant.default, (xr, s, z, -8, 7, 1, 0.5)),
        (OPS.lsq_fake_quant_backward.default, (g, x, s.detach(), z.detach(), -8, 7, 1, 0.5)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_hot_ops_have_cpp_autograd():
    """fake_quant and lsq_fake_quant carry their autograd in C++ (csrc/autograd.cpp)."""
    for name in ("fake_quant", "lsq_fake_quant"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ompq::{name}", "Autograd")
    x = torch.randn(3, 4, requires_grad=True)
    y = ops.fake_quant(x, torch.tensor([0.1]), torch.tensor([0.0]), 0, 15)
    assert y.grad_fn.name().endswith("CppNode<ompq::(anonymous namespace)::FakeQuantFunction>")


@pytest.mark.parametrize("which", ["x", "scale", "zero_point", "scale+zero_point"])
@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_grads_only_for_inputs_that_need_them(which, axis, gen):
    """Each subset of inputs that requires grad gets exactly the reference gradients; the others
    get none (also an integer zero point, which cannot require grad)."""
    x0 = torch.randn(5, 6, 7, generator=gen) * 2
    c = 1 if axis is None else 6
    s0 = torch.rand(c, generator=gen) * 0.2 + 0.05
    z0 = torch.randint(0, 9, (c,), generator=gen).float() + 0.3
    g = torch.randn(5, 6, 7, generator=gen)
    g = g * ~_near_tie(x0, s0, z0.round().clamp(0, 15), axis)
    grads = {}
    for impl in (ops.lsq_fake_quant, reference.lsq_fake_quant):
        x, s, z = x0.clone(), s0.clone(), z0.clone()
        for name, t in (("x", x), ("scale", s), ("zero_point", z)):
            t.requires_grad_(name in which.split("+"))
        impl(x, s, z, 0, 15, axis, 0.5).backward(g)
        grads[impl] = (x.grad, s.grad, z.grad)
    for ours, ref in zip(grads[ops.lsq_fake_quant], grads[reference.lsq_fake_quant]):
        assert (ours is None) == (ref is None)
        if ours is not None:
            torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-4)
    # integer zero point: x and scale still get their gradients
    x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    zi = z0.round().to(torch.int32)
    ops.lsq_fake_quant(x, s, zi, 0, 15, axis).backward(g)
    assert x.grad is not None and s.grad is not None and s.grad.shape == s.shape


def test_fake_quant_autograd_graph_and_no_grad():
    """No graph under no_grad or without inputs that need grad; retain_graph backward twice gives
    the same gradient twice; the saved x is checked against in-place changes."""
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    x = torch.randn(4, 5, requires_grad=True)
    with torch.no_grad():
        assert ops.fake_quant(x, s, z, 0, 15).grad_fn is None
    assert ops.fake_quant(x.detach(), s, z, 0, 15).grad_fn is None
    y = ops.lsq_fake_quant(x, s.clone().requires_grad_(), z, 0, 15)
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    xm = torch.randn(4, 5).requires_grad_()
    base = xm * 1.0
    y = ops.fake_quant(base, s, z, 0, 15)
    with torch.no_grad():
        base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class _TinyQNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 2, 3, 3, generator=g) * 0.3)
        self.register_buffer("w_scale", torch.full((4,), 0.05))
        self.a_scale = torch.nn.Parameter(torch.tensor([0.1]))
        self.a_zp = torch.nn.Parameter(torch.tensor([3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ops.fake_quant(self.conv.weight, self.w_scale, torch.zeros(4), -8, 7, 0)
        h = torch.nn.functional.conv2d(x, w, self.conv.bias, padding=1)
        h = ops.lsq_fake_quant(torch.relu(h), self.a_scale, self.a_zp, 0, 255, None, 0.5)
        return h.mean(dim=(2, 3))


# inductor works too but compiles for ~60 s on a busy 2-core machine; aot_eager traces the same
# graph through the fake kernels and the registered autograd formulas.
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_forward_backward(backend, gen):
    torch._dynamo.reset()
    model = _TinyQNet()
    x = torch.randn(2, 2, 6, 6, generator=gen)
    eager = model(x)
    eager.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w)


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("axis", [None, 1])
def test_gradcheck_where_the_estimator_is_exact(impl, axis, gen):
    """Numerical gradcheck (float64) on inputs where the STE/LSQ gradients are true derivatives:
    every element clipped (y = (qmin|qmax - zp) * scale, so dy/dx = 0 and dy/dscale = bound - zp).
    eps = 2**-10 keeps the perturbed float32 scale exact and every element clipped."""
    fq = ops.lsq_fake_quant if impl == "ops" else reference.lsq_fake_quant
    sign = torch.where(torch.rand(3, 4, generator=gen) < 0.5, -1.0, 1.0)
    x = (sign * (50 + 10 * torch.rand(3, 4, generator=gen))).double().requires_grad_()
    c = 1 if axis is None else 4
    s = torch.full((c,), 0.25, dtype=torch.float64, requires_grad=True)
    z = torch.full((c,), 2.0, dtype=torch.float64)
    # grad_factor = 1: other values scale the LSQ gradient on purpose
    assert torch.autograd.gradcheck(lambda a, b: fq(a, b, z, -8, 7, axis, 1.0), (x, s),
                                    eps=2.0 ** -10, atol=1e-9, rtol=1e-9)
    assert torch.autograd.gradcheck(
        lambda a: (ops.fake_quant if impl == "ops" else reference.fake_quant)(a, s.detach(), z,
                                                                              -8, 7, axis),
        (x,), eps=2.0 ** -10, atol=1e-9, rtol=1e-9)
