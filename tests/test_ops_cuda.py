"""CUDA kernels of ompq against the CPU kernels (skipped without a CUDA GPU).

Bit equality where the CPU promises it (fake_quant / lsq forward, grad_x, AdaRound hard mode);
assert_close for sums (grad_scale, grad_zero_point, Gram, adaround_reg) and AdaRound's soft mode
(expf differs from the CPU's vectorised exp in the last bits). Every CUDA result must also be
bitwise reproducible run to run.
"""
from __future__ import annotations

import pytest
import torch

from ompq import ops, reference

from _helpers import fwd_bwd, gram64, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPS = torch.ops.ompq
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal values (NaN matches NaN whatever its payload)."""
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


def _leaf(t: torch.Tensor, dev=None) -> torch.Tensor:
    """A fresh leaf copy of t (on dev) that requires grad: never aliases or mutates t."""
    t = t.detach()
    t = t.clone() if dev is None or t.device == torch.device(dev) else t.to(dev)
    return t.requires_grad_()


def _data(shape, axis, dtype, gen, special=True):
    x = torch.randn(shape, generator=gen) * 3
    if special and x.numel() > 8:
        flat = x.view(-1)
        flat[0], flat[1], flat[2] = float("nan"), float("inf"), float("-inf")
        flat[3:8] = torch.tensor([0.5, 1.5, -2.5, 1e30, -1e30])
    c = 1 if axis is None else shape[axis]
    s = torch.rand(c, generator=gen) * 0.2 + 0.05
    z = torch.randint(0, 16, (c,), generator=gen).float()
    g = torch.randn(shape, generator=gen)
    return x.to(dtype), s, z, g.to(dtype)


def _compare_fq(x, s, z, g, axis, sum_tol=1e-5):
    for lsq in (False, True):
        if lsq:
            fn = lambda a, b, d: ops.lsq_fake_quant(a, b, d + 0.3, 0, 15, axis, 0.5)  # noqa: E731
        else:
            fn = lambda a, b, d: ops.fake_quant(a, b, d, 0, 15, axis)  # noqa: E731
        cpu = fwd_bwd(fn, x, s, z, g)
        dev = fwd_bwd(fn, x.cuda(), s.cuda(), z.cuda(), g.cuda())
        _same(dev[0], cpu[0])
        _same(dev[1], cpu[1])
        again = fwd_bwd(fn, x.cuda(), s.cuda(), z.cuda(), g.cuda())
        for a, b in zip(dev, again):
            if a is not None:
                _same(a, b)  # deterministic
        if lsq:
            for a, b in ((dev[2], cpu[2]), (dev[3], cpu[3])):
                assert a.dtype == b.dtype and a.shape == b.shape
                # NaN/Inf x contribute finite terms: a NaN sum would make the check vacuous.
                assert bool(torch.isfinite(b).all()), "CPU reference sum is not finite"
                # The CPU adds float32 partial sums of up to 512 vectors into fp64, the GPU
                # adds every term in fp64: the gap grows with the elements per channel.
                per = x.numel() / max(1, b.numel())
                torch.testing.assert_close(a.cpu(), b, rtol=sum_tol,
                                           atol=sum_tol * 10 * max(1.0, per ** 0.5 / 16),
                                           equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_fake_quant_and_lsq_match_cpu(dtype, axis, gen):
    x, s, z, g = _data((8, 33, 17), axis, dtype, gen)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    _compare_fq(x, s, z, g, axis, tol)


# (3, 1024, 1024) per tensor: 3 072 partials, the two-level finalise; (2, 3, 300000) axis 1:
# 293 segments per row (the finalise cursor wraps without a whole-row step).
@pytest.mark.parametrize("shape,axis", [((4, 3, 40, 40), 1), ((2, 1000, 9), 1), ((300, 5), -1),
                                        ((3, 2, 3000), 0), ((7,), None), ((512, 4608), 0),
                                        ((600, 4, 1300), 1), ((3, 1024, 1024), None),
                                        ((2, 3, 300000), 1)])
def test_layouts_long_and_short_rows(shape, axis, gen):
    x, s, z, g = _data(shape, axis, torch.float32, gen)
    _compare_fq(x, s, z, g, axis)


def test_many_channels(gen):
    """More than 65 535 channels (no grid.y limit)."""
    x, s, z, g = _data((2, 70000), 1, torch.float32, gen)
    _compare_fq(x, s, z, g, 1)
    x, s, z, g = _data((70000, 3), 0, torch.float32, gen)
    _compare_fq(x, s, z, g, 0)


def test_noncontiguous_and_empty(gen):
    x, s, z, g = _data((6, 8, 5), 2, torch.float32, gen)
    xt = x.transpose(0, 2)  # channels now along dim 0, non-contiguous
    _compare_fq(xt, s, z, g.transpose(0, 2), 0)
    for shape, axis in (((0, 4), 1), ((3, 0), 1), ((0,), None)):
        x, s, z, g = _data(shape, axis, torch.float32, gen, special=False)
        _compare_fq(x, s, z, g, axis)


def test_float64_is_native(gen):
    """float64 is computed in float64 (x/scale keeps more bits than float32 would)."""
    x = torch.tensor([1.0000000001, 2.5000000001], dtype=torch.float64)
    s, z = torch.tensor([1.0]), torch.tensor([0.0])
    _same(ops.fake_quant(x.cuda(), s.cuda(), z.cuda(), -8, 7), ops.fake_quant(x, s, z, -8, 7))
    assert ops.fake_quant(x.cuda(), s.cuda(), z.cuda(), -8, 7)[1].item() == 3.0


def test_params_dtypes_and_aliasing(gen):
    x, _, _, g = _data((4, 6), 1, torch.float64, gen)
    s, z = torch.rand(6, dtype=torch.float64) + 0.1, torch.zeros(6, dtype=torch.float64)
    _, gs, gz = OPS.lsq_fake_quant_backward(g.cuda(), x.cuda(), s.cuda(), z.cuda(), 0, 15, 1, 1.0)
    assert gs.dtype == torch.float64 and gz.dtype == torch.float64
    _, cgs, cgz = OPS.lsq_fake_quant_backward(g, x, s, z, 0, 15, 1, 1.0)
    assert bool(torch.isfinite(cgs).all() and torch.isfinite(cgz).all())
    torch.testing.assert_close(gs.cpu(), cgs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz.cpu(), cgz, rtol=1e-12, atol=1e-12)
    assert gs.untyped_storage().data_ptr() != gz.untyped_storage().data_ptr()
    zi = torch.zeros(6, dtype=torch.int32)
    cpu = OPS.lsq_fake_quant_backward(g, x, s, zi, 0, 15, 1, 1.0)
    dev = OPS.lsq_fake_quant_backward(g.cuda(), x.cuda(), s.cuda(), zi.cuda(), 0, 15, 1, 1.0)
    assert dev[2].dtype == cpu[2].dtype == torch.float32
    _same(dev[0], cpu[0])


def test_error_messages_match_cpu():
    x = torch.randn(2, 3, 4)
    s1, z1 = torch.tensor([0.1]), torch.tensor([0.0])
    bad = [
        (OPS.fake_quant, (x, -s1, z1, 0, 15)),
        (OPS.fake_quant, (x, torch.tensor([0.1, 0.0, 0.1]), torch.zeros(3), 0, 15, 1)),
        (OPS.lsq_fake_quant, (x, torch.tensor([float("nan")]), z1, 0, 15)),
        (OPS.fake_quant, (x, torch.tensor([1e-45]), z1, 0, 15)),
        (OPS.fake_quant, (x, s1, torch.tensor([20.0]), 0, 15)),
        (OPS.fake_quant, (x, s1, torch.tensor([float("inf")]), 0, 15)),
        (OPS.fake_quant, (x, s1, z1, 15, 0)),
        (OPS.fake_quant, (x.to(torch.float8_e4m3fn), s1, z1, 0, 15)),
        (OPS.fake_quant, (x, s1, torch.tensor([True]), 0, 15)),
        (OPS.lsq_fake_quant_backward, (x, x, s1, z1, 0, 15, None, float("inf"))),
        (OPS.fake_quant_backward, (x.double(), x, s1, z1, 0, 15)),
    ]
    for op, args in bad:
        with pytest.raises(RuntimeError) as cpu_err:
            op(*args)
        dev_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError) as dev_err:
            op(*dev_args)
        assert str(cpu_err.value).splitlines()[0] == str(dev_err.value).splitlines()[0]


def test_forward_rechecks_parameters_changed_in_place():
    """Parameters that passed are remembered (no sync), until they change: in place, through
    .data or by a new tensor."""
    x = torch.randn(4, 8, device="cuda")
    s = torch.full((8,), 0.1, device="cuda")
    z = torch.zeros(8, device="cuda")
    OPS.fake_quant(x, s, z, 0, 15, 1)
    OPS.fake_quant(x, s, z, 0, 15, 1)  # remembered
    s[3] = -1.0  # in place: the version counter moves
    with pytest.raises(RuntimeError, match="scale must be positive"):
        OPS.fake_quant(x, s, z, 0, 15, 1)
    s.data = torch.full((8,), 0.1, device="cuda")
    OPS.fake_quant(x, s, z, 0, 15, 1)
    s.data = torch.full((8,), float("nan"), device="cuda")
    with pytest.raises(RuntimeError, match="scale must be positive"):
        OPS.fake_quant(x, s, z, 0, 15, 1)
    s2, z2 = torch.full((8,), 0.1, device="cuda"), torch.full((8,), 5.0, device="cuda")
    OPS.fake_quant(x, s2, z2, 0, 15, 1)
    with pytest.raises(RuntimeError, match="outside"):  # the same tensors, a narrower range
        OPS.fake_quant(x, s2, z2, 0, 3, 1)


def test_mismatched_devices():
    x = torch.randn(2, 3).cuda()
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    with pytest.raises(RuntimeError, match="must be on the same device as x"):
        OPS.fake_quant(x, s, z, 0, 15)
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        OPS.fake_quant_backward(x.cpu(), x, s.cuda(), z.cuda(), 0, 15)
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        OPS.lsq_fake_quant_backward(x.cpu(), x, s.cuda(), z.cuda(), 0, 15)
    w, v = torch.randn(4, 3).cuda(), torch.randn(4, 3)
    with pytest.raises(ValueError, match="v is on cpu"):
        OPS.adaround_fake_quant(w, s.cuda(), z.cuda(), v, 0, 15, None, True)
    with pytest.raises(ValueError, match="grad is on cpu"):
        OPS.adaround_fake_quant_backward(w.cpu(), w, s.cuda(), z.cuda(), v.cuda(), 0, 15, None,
                                         True)
    with pytest.raises(ValueError, match="v is on cuda"):
        OPS.adaround_fake_quant(w.cpu(), s, z, v.cuda(), 0, 15, None, True)
    with pytest.raises(ValueError, match="grad is on cuda:0 but w is on cpu"):
        OPS.adaround_fake_quant_backward(w, w.cpu(), s, z, v, 0, 15, None, True)
    with pytest.raises(ValueError, match="grad is on cuda:0 but v is on cpu"):
        OPS.adaround_reg_backward(torch.ones((), device="cuda"), v, 2.0)
    with pytest.raises(ValueError, match="grad is on cpu but v is on cuda:0"):
        OPS.adaround_reg_backward(torch.ones(()), v.cuda(), 2.0)
    with pytest.raises(RuntimeError, match="grad is on cuda:0 but x is on cpu"):
        OPS.fake_quant_backward(x, x.cpu(), s, z, 0, 15)
    with pytest.raises(RuntimeError, match="grad is on cuda:0 but x is on cpu"):
        OPS.lsq_fake_quant_backward(x, x.cpu(), s, z, 0, 15)


def test_backward_ops_do_not_sync_and_forward_is_capturable(gen):
    """The backward ops skip the device value check (no sync) and the forward skips it while a
    CUDA graph is being captured: forward + backward capture and replay to the eager results."""
    x, s, z, g = (t.cuda() for t in _data((4, 8, 300), 1, torch.float32, gen, special=False))
    eager = (OPS.fake_quant(x, s, z, 0, 15, 1), OPS.fake_quant_backward(g, x, s, z, 0, 15, 1),
             OPS.lsq_fake_quant(x, s, z, 0, 15, 1, 0.5),
             *OPS.lsq_fake_quant_backward(g, x, s, z, 0, 15, 1, 0.5))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        OPS.fake_quant(x, s, z, 0, 15, 1)
        OPS.lsq_fake_quant_backward(g, x, s, z, 0, 15, 1, 0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (OPS.fake_quant(x, s, z, 0, 15, 1), OPS.fake_quant_backward(g, x, s, z, 0, 15, 1),
               OPS.lsq_fake_quant(x, s, z, 0, 15, 1, 0.5),
               *OPS.lsq_fake_quant_backward(g, x, s, z, 0, 15, 1, 0.5))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, eager):
        _same(a, b)
    # The forward still validates eagerly; the backward ops trust their (forward-checked) inputs.
    with pytest.raises(RuntimeError, match="scale"):
        OPS.fake_quant(x, -s, z, 0, 15, 1)
    OPS.fake_quant_backward(g, x, -s, z, 0, 15, 1)  # undefined values, but no error and no sync


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("soft", [False, True])
def test_adaround_matches_cpu(dtype, axis, soft, gen):
    w = (torch.randn(6, 40, 9, generator=gen) * 0.3).to(dtype)
    v = (torch.randn(6, 40, 9, generator=gen) * 2).to(dtype)
    v_nan = v.clone()
    v_nan.view(-1)[0] = float("nan")  # documented NaN propagation through the quantizer
    c = 1 if axis is None else w.shape[axis]
    s = (torch.rand(c, generator=gen) * 0.05 + 0.01).to(dtype)
    z = torch.randint(0, 4, (c,), generator=gen).to(dtype)
    g = torch.randn(w.shape, generator=gen).to(dtype)

    def run(dev):
        wr, vr = _leaf(w, dev), _leaf(v_nan, dev)
        y = ops.adaround_fake_quant(wr, s.to(dev), z.to(dev), vr, -8, 7, axis, soft)
        y.backward(g.to(dev))
        vreg = _leaf(v, dev)  # finite v: the regulariser and its gradient are compared for real
        reg = ops.adaround_reg(vreg, 2.0)
        reg.backward()
        return (y.detach().cpu(), wr.grad.cpu(), vr.grad.cpu(), reg.detach().cpu(),
                vreg.grad.cpu())

    cpu, dev, again = run("cpu"), run("cuda"), run("cuda")
    assert w.grad is None and v.grad is None and not w.requires_grad  # inputs untouched
    for a, b in zip(dev, again):
        _same(a, b)
    if soft:
        for a, b in zip(dev[:3], cpu[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    else:
        for a, b in zip(dev[:3], cpu[:3]):
            _same(a, b)
    assert bool(torch.isfinite(cpu[3])) and bool(torch.isfinite(cpu[4]).all())
    assert dev[3].dtype == cpu[3].dtype == dtype and dev[3].shape == cpu[3].shape == ()
    torch.testing.assert_close(dev[3], cpu[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dev[4], cpu[4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(2, 1), (63, 33), (65, 1000), (130, 70000)])
def test_centered_gram_matches_reference(dtype, n, d, gen):
    x = (torch.relu(torch.randn(n, d, generator=gen)) * 3 + 5).to(dtype)
    ref = gram64(x)
    dev = ops.centered_gram(x.cuda())
    again = ops.centered_gram(x.cuda())
    _same(dev, again)
    assert torch.equal(dev, dev.T)
    torch.testing.assert_close(dev.double().cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    torch.testing.assert_close(dev.cpu(), ops.centered_gram(x), rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_centered_gram_large_d_accuracy(gen):
    """N = 64, D = 200 000, post-ReLU-like with a large mean: 1e-5 relative vs fp64."""
    x = torch.relu(torch.randn(64, 200_000, generator=gen)) * 3 + 5
    assert rel_err(ops.centered_gram(x.cuda()).cpu(), gram64(x)) < 1e-5


def test_opcheck_cuda(gen):
    x = torch.randn(3, 4, 5, generator=gen).cuda()
    s = (torch.rand(4, generator=gen) + 0.1).cuda().requires_grad_()
    z = torch.zeros(4).cuda().requires_grad_()
    xr = x.clone().requires_grad_()
    g = torch.randn(3, 4, 5, generator=gen).cuda()
    w = torch.randn(4, 5, generator=gen).cuda().requires_grad_()
    v = torch.randn(4, 5, generator=gen).cuda().requires_grad_()
    sw, zw = torch.full((4,), 0.1).cuda(), torch.zeros(4).cuda()
    checks = [
        (OPS.fake_quant.default, (xr, s.detach(), z.detach(), -8, 7, 1)),
        (OPS.fake_quant_backward.default, (g, x, s.detach(), z.detach(), -8, 7, 1)),
        (OPS.lsq_fake_quant.default, (xr, s, z, -8, 7, 1, 0.5)),
        (OPS.lsq_fake_quant_backward.default, (g, x, s.detach(), z.detach(), -8, 7, 1, 0.5)),
        (OPS.adaround_fake_quant.default, (w, sw, zw, v, -8, 7, 0, True)),
        (OPS.adaround_reg.default, (v, 2.0)),
        (OPS.centered_gram.default, (torch.randn(5, 7, generator=gen).cuda(),)),
        (OPS.centered_gram_mm.default, (torch.randn(5, 7, generator=gen).cuda(),)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------
# Packed weights: pack_rows / unpack_rows / packed_linear on CUDA against the CPU ops
# ------------------------------------------------------------------------------------------

def _packed_layer(rows, k, bits, gen):
    codes = torch.randint(0, 2 ** bits, (rows, k), generator=gen)
    scale = torch.rand(rows, generator=gen) * 0.2 + 1e-3
    offset = torch.randint(0, 2 ** bits, (rows,), generator=gen).float()
    return codes, scale, offset


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("rows,k", [(1, 1), (7, 9), (33, 100), (64, 4100), (130, 257)])
def test_packed_ops_match_cpu(bits, rows, k, gen):
    """pack_rows and unpack_rows bitwise equal to the CPU; packed_linear (GEMV for batch <= 4,
    tiled above) within 1e-5 of the fp64 product relative to |x| @ |w|.T + |b| (the CUDA
    kernels sum x·(u - offset)), for every width, with and without bias, and reproducible."""
    codes, scale, offset = _packed_layer(rows, k, bits, gen)
    packed = ops.pack_rows(codes, bits)
    pd = ops.pack_rows(codes.cuda(), bits)
    _same(pd, packed)
    _same(ops.pack_rows(codes.to(torch.uint8).cuda(), bits), packed)
    sd, od = scale.cuda(), offset.cuda()
    out = torch.full((rows, k), float("nan"), device="cuda")
    ops.unpack_rows(pd, bits, k, sd, od, out)
    _same(out, reference.dequantize_rows(packed, bits, k, scale, offset))
    w = (codes.double() - offset.double()[:, None]) * scale.double()[:, None]
    for batch in ((1,), (2,), (3,), (4,), (5,), (64,), (130,), (2, 3)):
        for bias in (None, torch.randn(rows, generator=gen)):
            x = torch.randn(*batch, k, generator=gen)
            bd = None if bias is None else bias.cuda()
            y = ops.packed_linear(x.cuda(), pd, bits, k, sd, od, bd)
            assert y.shape == (*batch, rows) and y.is_cuda
            _same(y, ops.packed_linear(x.cuda(), pd, bits, k, sd, od, bd))  # deterministic
            x2 = x.reshape(-1, k).double()
            ref = x2 @ w.T
            mag = x2.abs() @ w.abs().T
            if bias is not None:
                ref, mag = ref + bias.double(), mag + bias.double().abs()
            err = (y.cpu().reshape(-1, rows).double() - ref).abs()
            assert bool((err <= 1e-5 * mag + 1e-30).all()), float((err / mag).max())


def test_packed_cuda_misaligned_and_errors(gen):
    """A packed view that does not start on an 8-byte boundary is read correctly; bad input
    raises the CPU's messages."""
    codes, scale, offset = _packed_layer(5, 24, 8, gen)
    packed = ops.pack_rows(codes, 8)
    buf = torch.zeros(1 + packed.numel(), dtype=torch.uint8)
    buf[1:] = packed.reshape(-1)
    view = buf.cuda()[1:].view(5, 24)
    x = torch.randn(3, 24, generator=gen)
    torch.testing.assert_close(ops.packed_linear(x.cuda(), view, 8, 24, scale.cuda(),
                                                 offset.cuda()).cpu(),
                               ops.packed_linear(x, packed, 8, 24, scale, offset),
                               rtol=1e-5, atol=1e-5)
    bad = codes.clone()
    bad[3, 7] = 256
    with pytest.raises(ValueError, match=r"got 256 at \[3, 7\]"):
        ops.pack_rows(bad.cuda(), 8)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8, got 9"):
        ops.packed_linear(x.cuda(), packed.cuda(), 9, 24, scale.cuda(), offset.cuda())
    with pytest.raises(TypeError, match="x must be float32, got Double"):
        ops.packed_linear(x.double().cuda(), packed.cuda(), 8, 24, scale.cuda(), offset.cuda())
    with pytest.raises(ValueError, match="x is on cpu but packed is on cuda"):
        ops.packed_linear(x, packed.cuda(), 8, 24, scale.cuda(), offset.cuda())


def test_opcheck_packed_cuda(gen):
    codes, scale, offset = _packed_layer(5, 19, 3, gen)
    pd = ops.pack_rows(codes, 3).cuda()
    sd, od = scale.cuda(), offset.cuda()
    checks = [
        (OPS.pack_rows.default, (codes.int().cuda(), 3)),
        (OPS.unpack_rows.default, (pd, 3, 19, sd, od, torch.empty(5, 19, device="cuda"))),
        (OPS.packed_linear.default, (torch.randn(2, 19).cuda(), pd, 3, 19, sd, od,
                                     torch.randn(5).cuda())),
        (OPS.packed_linear.default, (torch.randn(9, 19).cuda(), pd, 3, 19, sd, od, None)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)
