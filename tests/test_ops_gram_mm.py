"""centered_gram_mm (the GEMM + exact-centring path of csrc/cpu/gram_mm.cpp) against an fp64 Gram
and against the tiled centered_gram kernel; its checks, fallback and autograd; CUDA (skipped
without a GPU).

Tolerances. Both ops round only in fp32 (u = 2**-24 ≈ 6e-8): the tiled kernel centres in fp32 and
accumulates 256 products in fp32 before each fp64 flush, the GEMM path accumulates 1024-column
slices in fp32 (in MKL's / cuBLAS's order) and adds them and the centring correction in fp64.
Measured on CPU over the cases below (random normal, post-ReLU, mean 1e3 with spread 1; fp32,
bf16, fp16; N in {4, 32, 257}; D in {1, 1000, 100 000}) the GEMM path's error relative to the
largest fp64 entry stays within 4x of the tiled kernel's (worst: bf16 N(0,1) at D = 100 000,
2.2e-7 vs 6.6e-8) and below 1.5e-6 (bf16 with mean 1e3, where the tiled kernel has 1.6e-6 too:
the input's own 8-bit mantissa). So: each op within 1e-5 of fp64 (the project's target, as in
test_ops_gram_adaround.py), and the GEMM path within 8 * max(tiled error, u) - a factor 2 of
headroom over the measured 4, far below what a lost bit of cancellation would cost (the
uncentred product in fp32 is off by 1e-2 .. 1 on the mean-1e3 cases, see the offset test).
"""
from __future__ import annotations

import os

import pytest
import torch

from ompq import ops, reference

from _helpers import gram64, rel_err

OPS = torch.ops.ompq
U = 2.0 ** -24


def _features(kind: str, n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x = {"normal": z, "relu": torch.relu(z), "offset": z + 1000.0}[kind]
    return x.to(dtype)


def _check_close_to_tiled(x: torch.Tensor) -> tuple[float, float]:
    ref = gram64(x)
    g = ops.centered_gram_mm(x)
    assert g.dtype == torch.float32 and g.shape == (x.shape[0], x.shape[0])
    assert torch.equal(g, g.T)
    err_mm, err_tiled = rel_err(g, ref), rel_err(ops.centered_gram(x), ref)
    assert err_mm < 1e-5 and err_tiled < 1e-5
    assert err_mm <= 8 * max(err_tiled, U), (err_mm, err_tiled)
    return err_mm, err_tiled


def test_extension_op_present():
    assert ops.has_op("centered_gram_mm"), "compiled op ompq::centered_gram_mm missing"


@pytest.mark.parametrize("kind", ["normal", "relu", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(4, 1), (32, 1), (4, 1000), (32, 1000), (257, 1000),
                                 (4, 100_000), (32, 100_000)])
def test_matches_fp64_and_tiled(kind, dtype, n, d):
    _check_close_to_tiled(_features(kind, n, d, dtype))


def test_large_n_and_d():
    # N = 257, D = 100 000 with mean 1e3: both passes, several column groups (32 MiB each on CPU).
    _check_close_to_tiled(_features("offset", 257, 100_000, torch.float32, seed=1))


def test_large_mean_needs_the_centred_pass():
    # Mean 1e3, spread 1: the uncentred fp32 product loses ~20 bits (kappa ~ 1e6), so the op must
    # take its centred second pass; the fp64-corrected uncentred product alone is hopeless.
    x = _features("offset", 32, 5000, torch.float32)
    ref = gram64(x)
    assert rel_err(ops.centered_gram_mm(x), ref) < 1e-6
    g = (x @ x.T).double()
    b = g.mean(1, keepdim=True) - 0.5 * g.mean()
    assert rel_err(g - (b + b.T), ref) > 1e-3


def test_agrees_with_centered_gram(gen):
    x = torch.relu(torch.randn(40, 3000, generator=gen)) * 3 + 5
    ref = gram64(x)
    torch.testing.assert_close(ops.centered_gram_mm(x), ops.centered_gram(x), rtol=0,
                               atol=1e-6 * float(ref.abs().max()))


def test_flattens_strides_and_degenerate_inputs(gen):
    x = torch.randn(8, 3, 5, 5, generator=gen)
    assert torch.equal(ops.centered_gram_mm(x), ops.centered_gram_mm(x.reshape(8, -1)))
    xt = torch.randn(1500, 12, generator=gen).T  # non-contiguous 12×1500
    torch.testing.assert_close(ops.centered_gram_mm(xt), ops.centered_gram_mm(xt.contiguous()))
    xs = torch.randn(10, 3000, generator=gen)[:, ::3]  # strided columns
    assert rel_err(ops.centered_gram_mm(xs), gram64(xs)) < 1e-6
    xw = torch.randn(6, 5000, generator=gen)[:, 7:2100]  # row stride > D, unaligned start
    assert rel_err(ops.centered_gram_mm(xw), gram64(xw)) < 1e-6
    same = torch.randn(1, 2000, generator=gen).expand(5, 2000)  # identical rows: Gram 0
    assert float(ops.centered_gram_mm(same).abs().max()) < 1e-6
    assert torch.equal(ops.centered_gram_mm(torch.zeros(4, 300)), torch.zeros(4, 4))
    assert torch.equal(ops.centered_gram_mm(torch.zeros(3, 0)), torch.zeros(3, 3))


def test_deterministic(gen):
    x = torch.randn(40, 20000, generator=gen)
    assert torch.equal(ops.centered_gram_mm(x), ops.centered_gram_mm(x))


# The bad-input errors are tested with centered_gram's (tests/test_ops_gram_adaround.py).


def test_reference_and_fallback(gen, monkeypatch):
    x = _features("offset", 16, 3000, torch.bfloat16)
    ref = gram64(x)
    assert rel_err(reference.centered_gram_mm(x), ref) < 1e-5
    monkeypatch.setattr(ops, "has_op", lambda name: False)  # as without the extension
    assert torch.equal(ops.centered_gram_mm(x), reference.centered_gram_mm(x))


def test_reduced_fp32_matmul_precision_is_not_used(gen):
    # oneDNN fp32 matmuls at bf16 precision (a global opt-in): the op computes in fp64 instead.
    x = torch.randn(32, 4000, generator=gen) + 2.0
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        err = rel_err(ops.centered_gram_mm(x), gram64(x))
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert err < 1e-6


# Backward and opcheck: with centered_gram's (tests/test_ops_gram_adaround.py).


# ------------------------------------------------------------------------------------ CUDA --
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "relu", "offset"])
@pytest.mark.parametrize("n,d", [(4, 1), (33, 1000), (64, 200_000)])
def test_cuda_matches_fp64_and_cpu(dtype, kind, n, d, monkeypatch):
    x = _features(kind, n, d, dtype)
    ref = gram64(x)
    tol = dict(rtol=0, atol=1e-5 * float(ref.abs().max()))
    dev = ops.centered_gram_mm(x.cuda())
    assert dev.is_cuda and torch.equal(dev, dev.T)
    torch.testing.assert_close(dev.double().cpu(), ref, **tol)
    torch.testing.assert_close(dev.cpu(), ops.centered_gram_mm(x), **tol)
    before = torch.backends.cuda.matmul.allow_tf32
    try:  # TF32 allowed globally: the op's fp32 products stay IEEE fp32 (at::NoTF32Guard)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.testing.assert_close(ops.centered_gram_mm(x.cuda()).double().cpu(), ref, **tol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    # centered_gram on CUDA: both of its paths (forced), and its own choice.
    for path in ("tiled", "mm", None):
        if path is None:
            monkeypatch.delenv("OMPQ_CUDA_GRAM", raising=False)
        else:
            monkeypatch.setenv("OMPQ_CUDA_GRAM", path)
        torch.testing.assert_close(ops.centered_gram(x.cuda()).double().cpu(), ref, **tol)
    assert os.environ.get("OMPQ_CUDA_GRAM") is None
