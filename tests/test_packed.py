"""Packed checkpoints (ompq.packed): bit packing, round trip with exact outputs, size accounting
against the BitConfig, wrong inputs, integrity checks (flipped bytes, truncation, version 1) and
atomic saves."""
import hashlib
import json
import os
import re
import struct
from typing import Optional

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


# ---------------------------------------------------------------- integrity (format version 2)
def _saved(tmp_path, gen, name="m.ompq"):
    x = torch.randn(8, 1, 28, 28, generator=gen)
    path = tmp_path / name
    packed.save_packed(quantized_net(x), path)
    return path, x


def _split(raw: bytes):
    """(header dict, data blob) of a version-2 file's bytes."""
    (n,) = struct.unpack("<Q", raw[8:16])
    return json.loads(raw[48:48 + n]), raw[48 + n:]


def _v2_bytes(head: bytes, data: bytes, magic: bytes = packed.MAGIC) -> bytes:
    """A version-2 file with correct checksums around an arbitrary header and blob."""
    prefix = magic + struct.pack("<Q", len(head))
    return prefix + hashlib.sha256(prefix + head).digest() + head + data


def _assert_refused(path, match: Optional[str] = None) -> str:
    """Both readers refuse `path` with a one-line ValueError naming it; the message."""
    for read in (packed.read_packed_header, lambda p: packed.load_packed(p, small_net)):
        with pytest.raises(ValueError, match=match) as err:
            read(path)
        msg = str(err.value)
        assert repr(str(path)) in msg and "\n" not in msg, msg
    return msg


def _flip(raw: bytes, i: int, mask: int = 0xFF) -> bytes:
    return raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1:]


def test_packed_v2_layout(tmp_path, gen):
    path, _ = _saved(tmp_path, gen)
    raw = path.read_bytes()
    assert raw[:8] == packed.MAGIC == b"OMPQPK02"
    header, data = _split(raw)
    assert header["version"] == 2 and header["data"]["nbytes"] == len(data)
    assert header["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    (n,) = struct.unpack("<Q", raw[8:16])
    assert raw[16:48] == hashlib.sha256(raw[:16] + raw[48:48 + n]).digest()
    assert packed.read_packed_header(path) == (header, len(raw) - len(data))


@pytest.mark.parametrize("where,match", [
    ("magic", "not an ompq packed checkpoint"), ("length", "corrupted or truncated"),
    ("header checksum", "header checksum"), ("header", "header checksum"),
    ("first data byte", "data checksum"), ("last data byte", "data checksum")])
@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_flipped_byte_is_refused(tmp_path, gen, where, match, mask):
    path, _ = _saved(tmp_path, gen)
    raw = path.read_bytes()
    data_start = len(raw) - len(_split(raw)[1])
    i = {"magic": 3, "length": 9, "header checksum": 20, "header": 60,
         "first data byte": data_start, "last data byte": len(raw) - 1}[where]
    path.write_bytes(_flip(raw, i, mask))
    msg = _assert_refused(path, match)
    assert "re-export it with ompq.packed.save_packed" in msg


def test_any_flipped_byte_is_refused(tmp_path, gen):
    path, _ = _saved(tmp_path, gen)
    raw = path.read_bytes()
    for i in sorted(set(np.linspace(0, len(raw) - 1, 41).astype(int))):
        bad = tmp_path / f"flip{i}.ompq"
        bad.write_bytes(_flip(raw, int(i), 0x10))
        _assert_refused(bad)


@pytest.mark.parametrize("cut,match", [
    (1, "expected \\d+ bytes of data, found \\d+"), ("half", "corrupted or truncated"),
    ("all", "is empty"), ("to magic", "fewer than the 48")])
def test_truncated_file_is_refused(tmp_path, gen, cut, match):
    path, _ = _saved(tmp_path, gen)
    raw = path.read_bytes()
    keep = {1: len(raw) - 1, "half": len(raw) // 2, "all": 0, "to magic": 8}[cut]
    path.write_bytes(raw[:keep])
    _assert_refused(path, match)


def test_extended_file_is_refused(tmp_path, gen):
    path, _ = _saved(tmp_path, gen)
    path.write_bytes(path.read_bytes() + b"\0")
    _assert_refused(path, "expected \\d+ bytes of data, found \\d+")


def test_structural_errors_with_valid_checksums(tmp_path, gen):
    path, _ = _saved(tmp_path, gen)
    header, data = _split(path.read_bytes())
    bad = tmp_path / "bad.ompq"
    bad.write_bytes(_v2_bytes(b"{not json", data))
    _assert_refused(bad, "header is not valid JSON")
    key = next(iter(header["arrays"]))
    header["arrays"][key]["offset"] = len(data)
    bad.write_bytes(_v2_bytes(json.dumps(header).encode(), data))
    _assert_refused(bad, f"array '{re.escape(key)}' lies at bytes .* outside the {len(data)} bytes")
    raw = _v2_bytes(b"{}", b"")
    bad.write_bytes(raw[:8] + struct.pack("<Q", 10 ** 6) + raw[16:])
    _assert_refused(bad, "header length field says 1000000 bytes")
    bad.write_bytes(b"OMPQPK03" + raw[8:])
    _assert_refused(bad, "format version 3, newer than this ompq reads")


def _as_v1(raw: bytes) -> bytes:
    """The version-1 layout earlier releases wrote (no checksums) of a version-2 file's bytes."""
    header, data = _split(raw)
    header["version"] = 1
    del header["data"]
    head = json.dumps(header, separators=(",", ":")).encode()
    return packed.MAGIC_V1 + struct.pack("<Q", len(head)) + head + data


def test_version1_file_still_loads(tmp_path, gen):
    x = torch.randn(8, 1, 28, 28, generator=gen)
    model = quantized_net(x)
    packed.save_packed(model, tmp_path / "m.ompq")
    v1 = tmp_path / "v1.ompq"
    v1.write_bytes(_as_v1((tmp_path / "m.ompq").read_bytes()))
    assert packed.read_packed_header(v1)[0]["version"] == 1
    assert torch.equal(packed.load_packed(v1, small_net)(x), model(x))
    raw = v1.read_bytes()  # no checksums, but the structure is still checked
    v1.write_bytes(raw[:len(raw) // 2])
    _assert_refused(v1, "corrupted or truncated")
    v1.write_bytes(raw[:-1])
    _assert_refused(v1, "outside the")


# ---------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("previous", [True, False])
def test_interrupted_save_keeps_previous_file(tmp_path, gen, monkeypatch, previous):
    x = torch.randn(8, 1, 28, 28, generator=gen)
    path = tmp_path / "m.ompq"
    if previous:
        packed.save_packed(quantized_net(x), path)
    before = path.read_bytes() if previous else None

    def interrupted(fd):  # the new file is fully written, not yet renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        packed.save_packed(quantized_net(x, act_bits=4), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.ompq"] if previous else [])
    if previous:
        assert path.read_bytes() == before
        packed.load_packed(path, small_net)
