"""Tests of the compiled centered_gram / adaround ops against the plain-PyTorch reference.

The compiled extension is expected to be built (CI builds it); without it the wrappers fall back
to `ompq.reference` and the comparisons below become trivial, while the checks that call
`torch.ops.ompq.*` directly fail loudly.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ompq import ops, reference

from _helpers import gram64, rel_err

OPS = torch.ops.ompq
HYP = settings(max_examples=40, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------ centered_gram --
def test_extension_ops_present():
    for name in ("centered_gram", "adaround_fake_quant", "adaround_fake_quant_backward",
                 "adaround_reg", "adaround_reg_backward"):
        assert ops.has_op(name), f"compiled op ompq::{name} missing (build the extension)"


@pytest.mark.parametrize("n", [2, 3, 17, 64, 70])
@pytest.mark.parametrize("d", [1, 15, 1000, 4099])
def test_gram_matches_fp64(n, d, gen):
    x = torch.randn(n, d, generator=gen) * 2 + 0.5
    g = ops.centered_gram(x)
    assert g.dtype == torch.float32 and g.shape == (n, n)
    assert torch.equal(g, g.T)
    assert rel_err(g, gram64(x)) < 1e-5


def test_gram_large_mean_post_relu(gen):
    # Post-ReLU features with a mean 1000× their spread: centring must happen before the product.
    x = torch.relu(torch.randn(64, 30000, generator=gen)) * 0.5 + 500.0
    ref = gram64(x)
    assert rel_err(ops.centered_gram(x), ref) < 1e-5
    # The "K - row mean - column mean + mean" shortcut in fp32 is hopeless here (why we centre).
    k = x @ x.T
    naive = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    assert rel_err(naive, ref) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_half_inputs(dtype, gen):
    x = (torch.relu(torch.randn(33, 5000, generator=gen)) * 3 + 20).to(dtype)
    g = ops.centered_gram(x)
    assert g.dtype == torch.float32
    assert rel_err(g, gram64(x)) < 1e-5


def test_gram_flattens_and_handles_strides(gen):
    x = torch.randn(8, 3, 5, 5, generator=gen)
    assert torch.equal(ops.centered_gram(x), ops.centered_gram(x.reshape(8, -1)))
    xt = torch.randn(100, 12, generator=gen).T  # non-contiguous 12×100
    torch.testing.assert_close(ops.centered_gram(xt), ops.centered_gram(xt.contiguous()))
    xs = torch.randn(10, 300, generator=gen)[:, ::3]  # strided columns
    assert rel_err(ops.centered_gram(xs), gram64(xs)) < 1e-5


def test_gram_deterministic(gen):
    x = torch.randn(40, 20000, generator=gen)
    assert torch.equal(ops.centered_gram(x), ops.centered_gram(x))


@pytest.mark.parametrize("fn", [ops.centered_gram, reference.centered_gram,
                                ops.centered_gram_mm, reference.centered_gram_mm])
def test_gram_errors(fn):
    # centered_gram_mm: the same exception types and messages as centered_gram.
    with pytest.raises(ValueError, match="centered_gram: expected an N×D matrix"):
        fn(torch.randn(10))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(torch.randn(1, 10))
    for dtype in (torch.int32, torch.float64):
        with pytest.raises(TypeError, match="unsupported dtype"):
            fn(torch.ones(4, 10, dtype=dtype))
    bad = torch.randn(4, 10)
    for v in (float("nan"), float("inf"), float("-inf")):
        bad[2, 3] = v
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):  # the centred fp32 Gram overflows
        fn(torch.tensor([[3e19, 0.0], [-3e19, 1.0]]))


@pytest.mark.parametrize("name", ["centered_gram", "centered_gram_mm"])
def test_gram_backward_matches_reference(gen, name):
    x = torch.randn(6, 4, 7, generator=gen) + 3
    wgt = torch.randn(6, 6, generator=gen)
    xa = x.clone().requires_grad_()
    (getattr(ops, name)(xa) * wgt).sum().backward()
    xr = x.double().requires_grad_()
    xc = xr.reshape(6, -1) - xr.reshape(6, -1).mean(0, keepdim=True)
    ((xc @ xc.T) * wgt.double()).sum().backward()
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["centered_gram", "centered_gram_mm"])
def test_gram_opcheck(gen, name):
    x = torch.randn(5, 40, generator=gen)
    torch.library.opcheck(getattr(OPS, name).default, (x,),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------------------ adaround --
def _quant_case(draw_shape, axis, bits, symmetric, dtype, gen, tiny_scale=False):
    w = torch.randn(draw_shape, generator=gen, dtype=dtype)
    v = torch.randn(draw_shape, generator=gen, dtype=dtype) * 4
    c = 1 if axis is None else draw_shape[axis]
    lo = 1e-6 if tiny_scale else 0.01
    scale = torch.rand(c, generator=gen, dtype=dtype) * 0.2 + lo
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        zp = torch.zeros(c, dtype=dtype)
    else:
        qmin, qmax = 0, 2 ** bits - 1
        zp = torch.randint(0, qmax + 1, (c,), generator=gen).to(dtype)
    # Some weights exactly on grid points (w/s integral), some huge.
    flat = w.view(-1)
    sc = scale[0] if axis is None else None
    if sc is not None and flat.numel() > 2:
        flat[0] = 3 * sc
        flat[1] = -1e30 if dtype == torch.float32 else -1e200
    return w, v, scale, zp, qmin, qmax


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@HYP
@given(shape=shapes, data=st.data(), bits=st.integers(2, 8), symmetric=st.booleans(),
       soft=st.booleans(), double=st.booleans(), tiny=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_adaround_matches_reference(shape, data, bits, symmetric, soft, double, tiny, seed):
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    w, v, s, z, qmin, qmax = _quant_case(shape, axis, bits, symmetric, dtype, gen, tiny)
    y = ops.adaround_fake_quant(w, s, z, v, qmin, qmax, axis, soft)
    yr = reference.adaround_fake_quant(w, s, z, v, qmin, qmax, axis, soft)
    tol = 1e-12 if double else 1e-6
    if soft:
        torch.testing.assert_close(y, yr, rtol=tol, atol=tol * float(s.max()) * 8)
    else:
        assert torch.equal(y, yr)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    gw, gv = OPS.adaround_fake_quant_backward(g, w, s, z, v, qmin, qmax, axis, soft)
    gwr, gvr = reference.adaround_fake_quant_backward(g, w, s, z, v, qmin, qmax, axis, soft)
    assert torch.equal(gw, gwr)
    torch.testing.assert_close(gv, gvr, rtol=1e-5, atol=1e-6 * float(s.max()))


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("soft", [True, False])
def test_adaround_autograd_vs_plain_torch(axis, soft, gen):
    """The fused backward equals autograd through the plain formula (v) and the STE mask (w)."""
    shape = (6, 5, 3)
    w, v, s, z, qmin, qmax = _quant_case(shape, axis, 4, False, torch.float64, gen)
    wa, va = w.clone().requires_grad_(), v.clone().requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    (ops.adaround_fake_quant(wa, s, z, va, qmin, qmax, axis, soft) * g).sum().backward()
    vr = v.clone().requires_grad_()
    sb = reference._bcast(s, w, axis)
    zb = reference._bcast(z, w, axis)
    h = reference.adaround_h(vr) if soft else (vr >= 0).double()
    t = torch.floor(w / sb) + h + zb
    if soft:
        ((torch.clamp(t, qmin, qmax) - zb) * sb * g).sum().backward()
        torch.testing.assert_close(va.grad, vr.grad, rtol=1e-10, atol=1e-12)
    else:
        assert torch.count_nonzero(va.grad) == 0
    inside = ((t >= qmin) & (t <= qmax)).double()
    torch.testing.assert_close(wa.grad, g * inside, rtol=0, atol=0)


def test_adaround_gradcheck(gen):
    w, v, s, z, qmin, qmax = _quant_case((4, 6), 0, 3, True, torch.float64, gen)
    v = v.clamp(-2, 2).requires_grad_()  # away from the flat parts of the rectified sigmoid
    assert torch.autograd.gradcheck(
        lambda vv: ops.adaround_fake_quant(w, s, z, vv, qmin, qmax, 0, True), (v,))
    assert torch.autograd.gradcheck(lambda vv: ops.adaround_reg(vv, 3.0), (v,))


@pytest.mark.parametrize("beta", [2.0, 7.3, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaround_reg_matches_reference(beta, dtype, gen):
    v = torch.randn(3000, generator=gen, dtype=dtype) * 4
    r = ops.adaround_reg(v, beta)
    assert r.dim() == 0 and r.dtype == dtype
    torch.testing.assert_close(r, reference.adaround_reg(v.double(), beta).to(dtype),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    va, vr = v.clone().requires_grad_(), v.clone().requires_grad_()
    (ops.adaround_reg(va, beta) * 0.7).backward()
    (reference.adaround_reg(vr, beta) * 0.7).backward()
    torch.testing.assert_close(va.grad, vr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(OPS.adaround_reg_backward(torch.tensor(0.7, dtype=dtype), v, beta),
                               reference.adaround_reg_backward(torch.tensor(0.7, dtype=dtype), v,
                                                               beta), rtol=1e-5, atol=1e-6)


def test_adaround_nan_inf_behaviour():
    """Documented behaviour: NaN weights give NaN, ±Inf weights clamp to the grid ends, NaN v gives
    NaN in soft mode and h = 0 in hard mode (NaN >= 0 is False), exactly like the reference."""
    w = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.35])
    v = torch.tensor([0.5, 0.5, 0.5, float("nan")])
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    for soft in (True, False):
        y = ops.adaround_fake_quant(w, s, z, v, -8, 7, None, soft)
        yr = reference.adaround_fake_quant(w, s, z, v, -8, 7, None, soft)
        torch.testing.assert_close(y, yr, equal_nan=True)
    # ±Inf weights clamp to the grid ends like torch.clamp; NaN weights stay NaN.
    y = ops.adaround_fake_quant(w, s, z, v, -8, 7, None, False)
    assert math.isnan(y[0]) and y[1] == pytest.approx(0.7) and y[2] == pytest.approx(-0.8)
    assert y[3] == pytest.approx(0.3)  # hard mode: NaN >= 0 is False, so h = 0


def test_adaround_errors():
    w = torch.randn(8, 3)
    v = torch.randn(8, 3)
    s, z = torch.full((8,), 0.1), torch.zeros(8)
    with pytest.raises(ValueError, match=r"qmin \(7\) must be smaller than qmax \(-8\)"):
        ops.adaround_fake_quant(w, s, z, v, 7, -8, 0, True)
    with pytest.raises(ValueError, match="scale has 8 elements; expected 3"):
        ops.adaround_fake_quant(w, s, z, v, -8, 7, 1, True)
    with pytest.raises(ValueError, match="expected 1 .*per-tensor"):
        ops.adaround_fake_quant(w, s, z, v, -8, 7, None, True)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ops.adaround_fake_quant(w, s, z, v, -8, 7, 2, True)
    with pytest.raises(ValueError, match="positive and finite"):
        ops.adaround_fake_quant(w, torch.zeros(8), z, v, -8, 7, 0, True)
    with pytest.raises(ValueError, match="same shape as w"):
        ops.adaround_fake_quant(w, s, z, v[:4], -8, 7, 0, True)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.adaround_fake_quant(w.half(), s, z, v.half(), -8, 7, 0, True)
    with pytest.raises(ValueError, match="beta must be positive"):
        ops.adaround_reg(v, 0.0)


def test_adaround_opcheck(gen):
    w, v, s, z, qmin, qmax = _quant_case((4, 5), 0, 4, True, torch.float32, gen)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(OPS.adaround_fake_quant.default,
                          (w, s, z, v.requires_grad_(), qmin, qmax, 0, True), test_utils=utils)
    torch.library.opcheck(OPS.adaround_reg.default, (v, 2.0), test_utils=utils)


# ------------------------------------------------------------------------------- torch.compile --
def test_torch_compile(gen):
    x = torch.randn(8, 50, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    v = torch.randn(6, 4, generator=gen)
    s, z = torch.full((6,), 0.05), torch.zeros(6)

    def step(x, w, v):
        gram = ops.centered_gram(x)
        y = ops.adaround_fake_quant(w, s, z, v, -8, 7, 0, True)
        return gram.diagonal().sum() + (y * y).sum() + 0.01 * ops.adaround_reg(v, 2.0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xa, va = x.clone().requires_grad_(), v.clone().requires_grad_()
    xb, vb = x.clone().requires_grad_(), v.clone().requires_grad_()
    out_c = compiled(xa, w, va)
    out_e = step(xb, w, vb)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(va.grad, vb.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 7, 3), (33, 16, 40), (4, 128, 3, 5)])
def test_masked_gram_matches_fp64(gen, dtype, shape):
    x = (torch.randn(*shape, generator=gen) * 2 + 1).to(dtype)
    mask = torch.rand(shape[:2], generator=gen) > 0.3
    keep = mask.reshape(mask.shape + (1,) * (x.dim() - 2))
    ref = gram64(x.double().masked_fill(~keep, 0))
    for fn in (ops.centered_gram_masked, reference.centered_gram_masked):
        assert rel_err(fn(x, mask), ref) < 1e-6
    assert torch.equal(ops.centered_gram_masked(x, torch.ones_like(mask)), ops.centered_gram(x))


def test_masked_gram_strides_and_errors(gen):
    x = torch.randn(16, 3, 10, generator=gen).transpose(0, 1)  # non-contiguous (3, 16, 10)
    mask = torch.rand(3, 16, generator=gen) > 0.5
    torch.testing.assert_close(ops.centered_gram_masked(x, mask),
                               reference.centered_gram_masked(x, mask))
    for fn in (ops.centered_gram_masked, reference.centered_gram_masked):
        with pytest.raises(ValueError, match=r"mask must be \(N, T\) = \(3, 16\)"):
            fn(x, mask[:, :5])
        with pytest.raises(ValueError, match=r"expected an \(N, T, \.\.\.\) feature"):
            fn(x[:, 0], mask)
    torch.library.opcheck(OPS.centered_gram_masked.default, (x.contiguous(), mask),
                          test_utils=("test_schema", "test_faketensor"))
