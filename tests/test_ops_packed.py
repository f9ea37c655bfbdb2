"""Tests of the packed-weight ops pack_rows / unpack_rows / packed_linear (CPU kernels against
`ompq.reference` and an fp64 product; the CUDA kernels are tested in tests/test_ops_cuda.py).

pack_rows must equal the reference bit for bit (and the checkpoint's `pack_bits` stream row by
row when K % 8 == 0), unpack_rows must equal the reference's `(u - offset) * scale` exactly, and
packed_linear must be within 1e-5 of the fp64 `x @ w.T + b`, relative to the magnitude of the
terms the kernel adds up (`|x| @ (scale·(u + |offset|)).T + |b|`: the GEMV accumulates x·u and
subtracts offset·Σx, see csrc/cpu/packed_linear.cpp); with unit vectors for x it must return
single weights bit for bit (every code read at the right column, on both the GEMV and tiled paths).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ompq import ops, reference
from ompq.packed import pack_bits

OPS = torch.ops.ompq
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BATCH_SHAPES = [(), (1,), (4,), (5,), (7,), (64,), (2, 3)]


@pytest.fixture(autouse=True)
def _compiled():
    for name in ("pack_rows", "unpack_rows", "packed_linear"):
        assert ops.has_op(name), f"compiled op ompq::{name} missing (build the extension)"


def _layer(rows, k, bits, gen, *, int_offset=True, code_dtype=torch.int64):
    codes = torch.randint(0, 2 ** bits, (rows, k), generator=gen).to(code_dtype)
    scale = torch.rand(rows, generator=gen) * 0.2 + 1e-3
    offset = torch.randint(0, 2 ** bits, (rows,), generator=gen).float()
    if not int_offset:
        offset = offset + torch.rand(rows, generator=gen) - 0.5
    return codes, scale, offset


def _w64(codes, scale, offset):
    return (codes.double() - offset.double()[:, None]) * scale.double()[:, None]


def _check_linear(y, x, codes, scale, offset, bias, rtol=1e-5):
    """y within rtol of the fp64 product, relative to the magnitude of the summed terms."""
    xd = x.double()
    ref = xd @ _w64(codes, scale, offset).T
    terms = (scale.double()[:, None] * (codes.double() + offset.double().abs()[:, None]))
    mag = xd.abs() @ terms.T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bad = err > rtol * mag + 1e-30
    assert not bool(bad.any()), (f"max error {float(err.max()):.3g}, relative "
                                 f"{float((err / mag.clamp_min(1e-30)).max()):.3g}")


# ------------------------------------------------------------------------------------------
# Property tests: every width, odd shapes, batch 1 / 7 / 64 / leading dims, bias on and off
# ------------------------------------------------------------------------------------------

@st.composite
def layers(draw):
    bits = draw(st.integers(2, 8))
    rows = draw(st.one_of(st.integers(1, 9), st.integers(10, 70)))
    k = draw(st.one_of(st.integers(1, 17), st.integers(18, 300), st.sampled_from([8, 64, 256])))
    batch = draw(st.sampled_from(BATCH_SHAPES))
    use_bias = draw(st.booleans())
    int_offset = draw(st.booleans())
    code_dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return bits, rows, k, batch, use_bias, int_offset, code_dtype, seed


@SETTINGS
@given(layers())
def test_packed_ops_match_reference(case):
    bits, rows, k, batch, use_bias, int_offset, code_dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    codes, scale, offset = _layer(rows, k, bits, gen, int_offset=int_offset,
                                  code_dtype=code_dtype)
    # pack_rows: bit-exact, layout width, round trip
    packed = ops.pack_rows(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, (k + 7) // 8 * bits)
    assert torch.equal(packed, reference.pack_rows(codes, bits))
    assert torch.equal(reference.unpack_codes(packed, bits, k), codes.long())
    # unpack_rows: exactly the reference's (u - offset) * scale
    want = reference.dequantize_rows(packed, bits, k, scale, offset)
    assert torch.equal(want, ((codes.float() - offset[:, None]) * scale[:, None]))
    out = torch.full((rows, k), float("nan"))
    ops.unpack_rows(packed, bits, k, scale, offset, out)
    assert torch.equal(out, want)
    # packed_linear: kernel and reference against the fp64 product
    x = torch.randn(*batch, k, generator=gen)
    bias = torch.randn(rows, generator=gen) if use_bias else None
    y = ops.packed_linear(x, packed, bits, k, scale, offset, bias)
    assert y.shape == (*batch, rows)
    y_ref = reference.packed_linear(x, packed, bits, k, scale, offset, bias)
    x2 = x.reshape(-1, k)
    _check_linear(y.reshape(-1, rows), x2, codes, scale, offset, bias)
    _check_linear(y_ref.reshape(-1, rows), x2, codes, scale, offset, bias)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 64, 300])
def test_packed_linear_long_rows_post_relu(bits, batch, gen):
    """K = 4100 (several flush intervals and x chunks, a tail block), post-ReLU x with a large
    mean (offset·Σx cancels most of Σx·u): still 1e-5 of the fp64 product, here relative to
    |x| @ |w|.T, the plain magnitude of the result."""
    rows, k = 37, 4100
    codes, scale, offset = _layer(rows, k, bits, gen)
    offset = torch.full((rows,), float(2 ** (bits - 1)))  # weights centred on zero
    x = torch.relu(torch.randn(batch, k, generator=gen)) * 3 + 1
    bias = torch.randn(rows, generator=gen)
    y = ops.packed_linear(x, ops.pack_rows(codes, bits), bits, k, scale, offset, bias)
    w = _w64(codes, scale, offset)
    ref = x.double() @ w.T + bias.double()
    mag = x.double().abs() @ w.abs().T + bias.double().abs()
    assert float(((y.double() - ref).abs() / mag).max()) < 1e-5


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 9, 37, 300])
def test_one_hot_rows_read_single_weights_exactly(bits, k, gen):
    """x = unit vectors: y[n, r] = w[r, k_n] bit for bit on both paths (GEMV for batch <= 4,
    tiled above), so every code of every lane position is decoded at the right column."""
    codes, scale, offset = _layer(17, k, bits, gen)  # integer offsets: u - offset exact
    packed = ops.pack_rows(codes, bits)
    w = reference.dequantize_rows(packed, bits, k, scale, offset)
    eye = torch.eye(k)
    for idx in (torch.arange(k), torch.arange(k).flip(0)[:4], torch.tensor([k - 1])):
        y = ops.packed_linear(eye[idx], packed, bits, k, scale, offset)
        assert torch.equal(y, w[:, idx].T), (bits, k, len(idx))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_edge_shapes(bits, gen):
    """K = 1, C_out = 1, empty batches, in_features = 0, rows with all codes at the offset."""
    for rows, k in ((1, 1), (3, 1), (1, 9), (5, 8), (2, 7)):
        codes, scale, offset = _layer(rows, k, bits, gen)
        packed = ops.pack_rows(codes, bits)
        for batch in ((1,), (6,), (2, 3)):
            x = torch.randn(*batch, k, generator=gen)
            _check_linear(ops.packed_linear(x, packed, bits, k, scale, offset).reshape(-1, rows),
                          x.reshape(-1, k), codes, scale, offset, None)
    codes, scale, offset = _layer(4, 20, bits, gen)
    packed = ops.pack_rows(codes, bits)
    assert ops.packed_linear(torch.empty(0, 20), packed, bits, 20, scale, offset).shape == (0, 4)
    assert ops.packed_linear(torch.empty(2, 0, 20), packed, bits, 20, scale,
                             offset).shape == (2, 0, 4)
    # in_features = 0: packed [rows, 0], y = bias
    empty = ops.pack_rows(torch.empty(4, 0, dtype=torch.int64), bits)
    assert empty.shape == (4, 0)
    bias = torch.randn(4, generator=gen)
    torch.testing.assert_close(ops.packed_linear(torch.empty(3, 0), empty, bits, 0, scale,
                                                 offset, bias), bias.expand(3, 4))
    # a row whose codes all equal its offset is an all-zero weight row: y = bias (to rounding)
    codes = torch.full((2, 33), 2 ** bits - 1)
    off = torch.tensor([2.0 ** bits - 1, 0.0])
    x = torch.randn(5, 33, generator=gen)
    y = ops.packed_linear(x, ops.pack_rows(codes, bits), bits, 33, scale[:2], off, bias[:2])
    _check_linear(y, x, codes, scale[:2], off, bias[:2])


def test_noncontiguous_x_and_conv_shaped_out(gen):
    codes, scale, offset = _layer(6, 2 * 3 * 3, 4, gen)
    packed = ops.pack_rows(codes, 4)
    x = torch.randn(18, 9, generator=gen).t()  # [9, 18], not contiguous
    _check_linear(ops.packed_linear(x, packed, 4, 18, scale, offset), x, codes, scale, offset,
                  None)
    out = torch.empty(6, 2, 3, 3)  # a Conv2d weight buffer
    ops.unpack_rows(packed, 4, 18, scale, offset, out)
    assert torch.equal(out.reshape(6, 18), reference.dequantize_rows(packed, 4, 18, scale, offset))


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_deterministic_and_thread_count_independent(batch, gen):
    codes, scale, offset = _layer(301, 1000, 5, gen)
    packed = ops.pack_rows(codes, 5)
    x = torch.randn(batch, 1000, generator=gen)
    before = torch.get_num_threads()
    try:
        ys = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            ys.append(ops.packed_linear(x, packed, 5, 1000, scale, offset))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


# ------------------------------------------------------------------------------------------
# Layout: the checkpoint's packbits stream, row by row
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [8, 24, 64, 1000])
def test_layout_is_the_checkpoint_stream_per_row(bits, k, gen):
    codes = torch.randint(0, 2 ** bits, (5, k), generator=gen)
    packed = ops.pack_rows(codes, bits).numpy()
    for r in range(5):
        np.testing.assert_array_equal(packed[r], pack_bits(codes[r].numpy(), bits))
    # rows are whole bytes, so the rows back to back are the stream of the whole matrix
    np.testing.assert_array_equal(packed.reshape(-1), pack_bits(codes.numpy(), bits))


def test_layout_by_hand():
    """Group layout: code j of a group at bits [j·b, (j+1)·b) of the little-endian integer."""
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 7]])
    word = sum(c << (3 * j) for j, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    want = list(word.to_bytes(3, "little")) + [7, 0, 0]
    assert ops.pack_rows(codes, 3).tolist() == [want]
    assert ops.pack_rows(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03, 0, 0]]
    assert ops.pack_rows(torch.tensor([[3, 0, 1, 2, 1]]), 2).tolist() == [[0b10010011, 0b01]]


# ------------------------------------------------------------------------------------------
# Bad input: the kernels and the reference raise the same messages, naming the value
# ------------------------------------------------------------------------------------------

IMPLS = {
    "kernel": (OPS.pack_rows, OPS.unpack_rows, OPS.packed_linear),
    "reference": (reference.pack_rows, reference.unpack_rows, reference.packed_linear),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bad_input_messages(impl, gen):
    pack, unpack, linear = IMPLS[impl]
    codes, scale, offset = _layer(4, 20, 4, gen)
    packed = ops.pack_rows(codes, 4)  # [4, 12]
    x = torch.randn(3, 20, generator=gen)

    def raises(exc, text, fn, *args):
        with pytest.raises(exc, match=re.escape(text)):
            fn(*args)

    for bits in (1, 9):
        msg = f"bits must be an integer in 2..8, got {bits}"
        raises(ValueError, msg, pack, codes, bits)
        raises(ValueError, msg, linear, x, packed, bits, 20, scale, offset, None)
        raises(ValueError, msg, unpack, packed, bits, 20, scale, offset, torch.empty(4, 20))
    raises(ValueError, "codes must lie in [0, 15] for 4 bits (u = q - qmin), got 16 at [2, 5]",
           pack, codes.index_put((torch.tensor([2]), torch.tensor([5])), torch.tensor(16)), 4)
    raises(ValueError, "got -1 at [0, 19]",
           pack, codes.index_put((torch.tensor([0]), torch.tensor([19])), torch.tensor(-1)), 4)
    raises(TypeError, "codes must be an integer tensor (uint8, int32 or int64), got Float",
           pack, codes.float(), 4)
    raises(ValueError, "codes must be 2-D [out_rows, in_features], got a 1-D tensor", pack,
           codes[0], 4)
    raises(ValueError, "packed has 12 bytes per row, but in_features = 20 at 5 bits needs "
           "ceil(20 / 8) * 5 = 15 bytes per row", linear, x, packed, 5, 20, scale, offset, None)
    raises(ValueError, "packed has 12 bytes per row, but in_features = 30 at 4 bits needs "
           "ceil(30 / 8) * 4 = 16 bytes per row", linear, torch.randn(3, 30), packed, 4, 30,
           scale, offset, None)
    raises(ValueError, "packed has 11 bytes per row", unpack, packed[:, :11].contiguous(), 4,
           20, scale, offset, torch.empty(4, 20))
    raises(ValueError, "packed must be contiguous", linear, x,
           torch.zeros(12, 4, dtype=torch.uint8).t(), 4, 20, scale, offset, None)
    raises(TypeError, "packed must be a uint8 tensor (the packed codes), got Int", linear, x,
           packed.int(), 4, 20, scale, offset, None)
    raises(TypeError, "x must be float32, got Double", linear, x.double(), packed, 4, 20, scale,
           offset, None)
    raises(TypeError, "x must be float32, got Long", linear, x.long(), packed, 4, 20, scale,
           offset, None)
    raises(ValueError, "x has 21 features in its last dimension (shape [3, 21]) but "
           "in_features = 20", linear, torch.randn(3, 21), packed, 4, 20, scale, offset, None)
    raises(ValueError, "scale has 3 elements but packed has 4 rows", linear, x, packed, 4, 20,
           scale[:3], offset, None)
    raises(ValueError, "offset has 5 elements but packed has 4 rows", unpack, packed, 4, 20,
           scale, torch.zeros(5), torch.empty(4, 20))
    raises(TypeError, "scale must be float32, got Double", linear, x, packed, 4, 20,
           scale.double(), offset, None)
    raises(ValueError, "bias has 2 elements but packed has 4 rows", linear, x, packed, 4, 20,
           scale, offset, torch.zeros(2))
    raises(TypeError, "bias must be float32, got Half", linear, x, packed, 4, 20, scale, offset,
           torch.zeros(4, dtype=torch.half))
    raises(ValueError, "out has shape [4, 19] but the weight is 4 x 20", unpack, packed, 4, 20,
           scale, offset, torch.empty(4, 19))
    raises(TypeError, "out must be float32, got Double", unpack, packed, 4, 20, scale, offset,
           torch.empty(4, 20, dtype=torch.float64))
    raises(ValueError, "out must be contiguous", unpack, packed, 4, 20, scale, offset,
           torch.empty(20, 4).t())


# ------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------

def test_opcheck(gen):
    codes, scale, offset = _layer(5, 19, 3, gen)
    packed = ops.pack_rows(codes, 3)
    x = torch.randn(2, 3, 19, generator=gen)
    checks = [
        (OPS.pack_rows.default, (codes.int(), 3)),
        (OPS.unpack_rows.default, (packed, 3, 19, scale, offset, torch.empty(5, 19))),
        (OPS.packed_linear.default, (x, packed, 3, 19, scale, offset, torch.randn(5))),
        (OPS.packed_linear.default, (x[0], packed, 3, 19, scale, offset, None)),
        (OPS.packed_linear.default, (torch.randn(9, 19), packed, 3, 19, scale, offset, None)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


class _PackedMLP(torch.nn.Module):
    def __init__(self, gen) -> None:
        super().__init__()
        codes, scale, offset = _layer(12, 30, 4, gen)
        self.register_buffer("packed", ops.pack_rows(codes, 4))
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", torch.randn(12, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.packed_linear(torch.relu(x) * 2, self.packed, 4, 30, self.scale, self.offset,
                              self.bias)
        w = torch.empty(12, 30, device=x.device)
        ops.unpack_rows(self.packed, 4, 30, self.scale, self.offset, w)
        return torch.tanh(h) + x @ w.t()


# aot_eager traces through the fake kernels in a second; inductor compiles C++ for ~15 s on a
# busy 2-core machine, so it runs with the slow tests.
@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager(backend, gen):
    torch._dynamo.reset()
    model = _PackedMLP(gen)
    x = torch.randn(5, 30, generator=gen)
    with torch.no_grad():
        eager = model(x)
        try:
            compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
        except Exception as err:  # pragma: no cover - depends on the machine's toolchain
            if backend == "inductor" and "compil" in str(err).lower():
                pytest.skip(f"torch.compile's inductor backend does not work here: {err}")
            raise
    torch.testing.assert_close(compiled, eager)
