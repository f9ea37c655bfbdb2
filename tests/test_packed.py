"""Packed checkpoints (ompq.packed): bit packing, round trip with exact outputs, size accounting
against the BitConfig, wrong inputs."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from _qmodels import BITS, quantized_net, small_net
from ompq import packed


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(bits, gen):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=gen).numpy()
    stream = packed.pack_bits(codes, bits)
    assert stream.dtype == np.uint8 and stream.size == -(-codes.size * bits // 8)
    assert np.array_equal(packed.unpack_bits(stream, bits, codes.size), codes)


def test_pack_is_lsb_first():
    # codes 1 (=0b01) and 2 (=0b10) at 2 bits: stream bits 1,0,0,1 -> byte 0b1001 = 9
    assert packed.pack_bits(np.array([1, 2]), 2).tolist() == [9]
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        packed.pack_bits(np.array([4]), 2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_round_trip_exact(tmp_path, gen, symmetric):
    x = torch.randn(32, 1, 28, 28, generator=gen)
    model = quantized_net(x, symmetric)
    ref = model(x)
    info = packed.save_packed(model, tmp_path / "m.ompq")
    params = {"0": 72, "3": 16 * 4 * 9, "8": 160}
    assert info.weight_bytes == sum(-(-params[n] * b // 8) for n, b in BITS.items())
    assert info.within(0.05), info.to_dict()
    # a fresh float model: BN folding and quantized layers are replayed from the file
    loaded = packed.load_packed(tmp_path / "m.ompq", small_net)
    assert torch.equal(loaded(x), ref)
    assert isinstance(loaded[1], nn.Identity)


def test_packed_after_ptq_and_size_vs_bitconfig(tmp_path):
    from ompq.allocate import allocate
    from ompq.profile import profile
    from ompq.ptq import ptq

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 28, 28, generator=g)
    fp = small_net()
    prof = profile(fp, x, num_samples=32, progress=False)
    cfg = allocate(prof, size_mb=3.2 * sum(l.params for l in prof.layers) / 8 / 2 ** 20,
                   bits=(2, 3, 4))
    q = ptq(fp, cfg, x, num_samples=64, iters=3, act_iters=2, progress=False).model
    info = packed.save_packed(q, tmp_path / "p.ompq", cfg)
    assert abs(info.weight_bytes - cfg.size_mb * 2 ** 20) < len(cfg.weight_bits)
    assert info.within(0.05)
    loaded = packed.load_packed(tmp_path / "p.ompq", small_net)
    assert torch.equal(loaded(x), q(x))
    with pytest.raises(ValueError, match="differ"):
        bad = json.loads(cfg.to_json())
        bad["weight_bits"]["0"] = 8 if cfg.weight_bits["0"] != 8 else 2
        packed.save_packed(q, tmp_path / "bad.ompq", bad)


def test_load_packed_wrong_architecture(tmp_path, gen):
    x = torch.randn(8, 1, 28, 28, generator=gen)
    packed.save_packed(quantized_net(x), tmp_path / "m.ompq")
    with pytest.raises(ValueError, match="lacks"):
        packed.load_packed(tmp_path / "m.ompq", lambda: nn.Sequential(nn.Linear(3, 3)))
    (tmp_path / "junk.ompq").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not an ompq packed checkpoint"):
        packed.load_packed(tmp_path / "junk.ompq", small_net)
