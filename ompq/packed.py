"""Bit-packed checkpoints of quantized models: `save_packed`, `load_packed`, `read_packed_header`,
`read_packed` (header and raw arrays, for `ompq.runtime`).

One file: magic, header length, a SHA-256 of the header, a JSON header (arrays, layer grids,
module types, the BitConfig, the data blob's length and SHA-256) and a data blob in which every
quantized layer's integer weights are packed at exactly its bit-width (`pack_bits`, LSB first).
The file is written atomically (`ompq.checkpoint.atomic_path`). `read_packed_header` and
`load_packed` verify both checksums and every array's bounds, so a corrupted or truncated file is
refused with a one-line ValueError naming it; version-1 files (no checksums) still load,
unverified. `load_packed` rebuilds the fake-quant model with outputs equal to the saved one.
`PackedInfo` splits the file size into packed weights and overhead. The byte layout and the size
accounting are specified in docs/DESIGN.md, "Packed checkpoint format".
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .batchnorm import BN_TYPES
from .bitconfig import BitConfig, as_bit_config
from .checkpoint import atomic_path
from .layers import set_submodule
from .quantize import (QuantScheme, act_quantizer, added_modules, attach_quantizers,
                       float_weight, int_weight, layer_class, quant_layers, weight_quantizer)
from .stages import stage

PathLike = Union[str, os.PathLike]
MAGIC = b"OMPQPK02"  # format version 2: SHA-256 of the header and of the data blob
MAGIC_V1 = b"OMPQPK01"  # format version 1 (earlier releases): no checksums, read unverified
PACKED_FORMAT = "ompq.Packed"
PACKED_VERSION = 2
LENGTH_BYTES = 8  # the uint64 little-endian header length after the magic
DIGEST_BYTES = 32  # SHA-256 of magic + length + header, between the length and the header
MIB = 2 ** 20
_REEXPORT = "re-export it with ompq.packed.save_packed"


# ============================================================================ bit packing
def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes (each < 2**bits) into a uint8 stream, LSB first.

    Element k occupies stream bits ``[k·bits, (k+1)·bits)``; bit j of the element is stream bit
    ``k·bits + j``. The stream is ``ceil(n·bits / 8)`` bytes long.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"pack_bits: bits must be in [1, 16], got {bits}")
    c = np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)
    if c.size and (c.min() < 0 or c.max() >= 2 ** bits):
        raise ValueError(f"pack_bits: codes must lie in [0, {2 ** bits - 1}] for {bits} bits, "
                         f"got [{c.min()}, {c.max()}]")
    planes = ((c[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` unsigned codes (int64) from a uint8 stream."""
    flat = np.unpackbits(np.asarray(stream, dtype=np.uint8), bitorder="little",
                         count=count * bits)
    planes = flat.reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


# ============================================================================ quantized layers
def weight_codes(name: str, m: nn.Module) -> tuple[np.ndarray, int, int]:
    """Integer weight codes (int64) of the quantized layer `m` named `name`, with its grid's
    qmin/qmax (checked: the codes lie in it; a soft AdaRound quantizer raises)."""
    wq = weight_quantizer(m)
    if wq.mode == "adaround" and wq.soft:
        raise ValueError(f"layer {name!r}: weight quantizer is in soft AdaRound mode; finish "
                         "PTQ (it bakes the rounding) or call weight_quantizer(layer)"
                         ".bake_adaround(float_weight(layer)) before exporting")
    q = int_weight(m)
    qmin, qmax = int(wq.qmin), int(wq.qmax)
    q = q.detach().cpu().to(torch.int64)
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"layer {name!r}: integer weights outside [{qmin}, {qmax}]")
    return q.numpy(), qmin, qmax


def _as_f32_np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).contiguous().numpy()


@dataclass
class PackedInfo:
    """Sizes (bytes) of a packed checkpoint.

    `weight_bytes`: packed integer weights; `bitconfig_bytes`: the BitConfig's size
    (``size_mb · 2**20``, or ``Σ params·bits/8`` of the quantized layers without a BitConfig);
    `overhead_bytes`: everything else in the file = `header_bytes` (8 bytes of magic, 8 of
    length, the 32-byte header SHA-256 and the JSON metadata, which holds the data blob's
    SHA-256) + `scale_bytes` (fp32 scales and zero points) + `other_tensor_bytes` (biases,
    BatchNorm, activation ranges, non-quantized layers).
    """

    path: str
    file_bytes: int
    weight_bytes: int
    bitconfig_bytes: float
    header_bytes: int
    scale_bytes: int
    other_tensor_bytes: int
    layers: int

    @property
    def overhead_bytes(self) -> int:
        return self.header_bytes + self.scale_bytes + self.other_tensor_bytes

    @property
    def expected_bytes(self) -> float:
        """BitConfig size plus the stated overhead."""
        return self.bitconfig_bytes + self.overhead_bytes

    @property
    def rel_error(self) -> float:
        """(file − expected) / expected."""
        return (self.file_bytes - self.expected_bytes) / max(self.expected_bytes, 1.0)

    def within(self, tol: float = 0.05) -> bool:
        return abs(self.rel_error) <= tol

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(overhead_bytes=self.overhead_bytes, expected_bytes=self.expected_bytes,
                 rel_error=self.rel_error, file_mib=self.file_bytes / MIB,
                 weight_mib=self.weight_bytes / MIB, bitconfig_mib=self.bitconfig_bytes / MIB)
        return d


class _Blob:
    """Accumulates arrays into one byte buffer and records their header entries."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.entries: dict[str, dict] = {}

    def add(self, key: str, arr: np.ndarray, **extra: Any) -> int:
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        self.entries[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape),
                             "offset": self.buf.tell(), "nbytes": len(data), **extra}
        self.buf.write(data)
        return len(data)

    def nbytes(self, *suffixes: str) -> int:
        """Bytes of the arrays added so far whose keys end with one of `suffixes`."""
        return sum(e["nbytes"] for k, e in self.entries.items() if k.endswith(suffixes))


# ============================================================================ packed checkpoint
@stage("packed export")
def save_packed(model: nn.Module, path: PathLike, bit_config: Any = None, *,
                half: bool = False) -> PackedInfo:
    """Write the fake-quant `model` as a bit-packed checkpoint at `path` (format: docs/DESIGN.md).

    Args:
        model: a model quantized with `ompq.quantizers.quantize_` / `ptq` / `qat`.
        bit_config: its BitConfig (any form of `ompq.bitconfig.as_bit_config`); when given, its
            weight bits must equal the quantizers' bits, and its ``size_mb`` (when not 0) is the
            reference for the size check.
        half: store non-quantized floating tensors as fp16 (smaller, no longer exact).

    Returns:
        PackedInfo with the file size and its parts (bytes).
    """
    layers = quant_layers(model)
    if not layers:
        raise ValueError("save_packed: the model has no quantized layers; quantize it with "
                         "ompq.quantize_, ompq.ptq or ompq.qat")
    cfg = None if bit_config is None else as_bit_config(bit_config)
    if cfg is not None:
        _check_bits_match(layers, cfg)
    blob, meta_layers = _Blob(), {}
    skip_ptrs: set[int] = set()
    for name, m in layers:
        meta_layers[name] = _pack_layer(blob, name, m)
        wq = weight_quantizer(m)
        skip_ptrs.update({float_weight(m).data_ptr(), wq.scale.data_ptr(),
                          wq.zero_point.data_ptr()})
    weight_bytes, scale_bytes = blob.nbytes(":packed"), blob.nbytes(":scale", ":zero_point")
    other_bytes = _add_other_tensors(blob, model, skip_ptrs, half)
    data = blob.buf.getvalue()
    header = {
        "format": PACKED_FORMAT, "version": PACKED_VERSION,
        "model": type(model).__name__,
        "layers": meta_layers,
        "module_types": _module_types(model),
        "biased": [n for n, m in layers if getattr(m, "bias", None) is not None],
        "bit_config": None if cfg is None else cfg.to_dict(),
        "arrays": blob.entries,
        "data": {"nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }
    header_bytes = _write_packed(path, json.dumps(header, separators=(",", ":")).encode(), data)
    if cfg is not None and cfg.size_mb > 0:  # an imported, not completed config has size 0
        cfg_bytes = cfg.size_mb * MIB
    else:
        cfg_bytes = sum(int(np.prod(l["shape"])) * l["bits"] / 8 for l in meta_layers.values())
    return PackedInfo(path=str(path), file_bytes=os.path.getsize(path), weight_bytes=weight_bytes,
                      bitconfig_bytes=cfg_bytes, header_bytes=header_bytes,
                      scale_bytes=scale_bytes, other_tensor_bytes=other_bytes,
                      layers=len(meta_layers))


def _write_packed(path: PathLike, head: bytes, data: bytes) -> int:
    """Write magic | length | SHA-256 | `head` (JSON) | `data` to `path` atomically; returns the
    bytes before the data (magic, length, checksum and JSON header)."""
    prefix = MAGIC + struct.pack("<Q", len(head))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(prefix)
        f.write(hashlib.sha256(prefix + head).digest())
        f.write(head)
        f.write(data)
    return len(prefix) + DIGEST_BYTES + len(head)


def _module_types(model: nn.Module) -> dict[str, str]:
    """Class name of every submodule of the user's model (not those `quantize_` added)."""
    added = added_modules(model)
    return {n: layer_class(m).__name__ for n, m in model.named_modules()
            if n and n not in added}


def _pack_layer(blob: _Blob, name: str, m: nn.Module) -> dict[str, Any]:
    """Add a quantized layer's packed codes, scales and zero points to `blob`; its metadata."""
    codes, qmin, qmax = weight_codes(name, m)
    wq = weight_quantizer(m)
    bits = int(wq.bits)
    blob.add(f"{name}.weight:packed", pack_bits(codes - qmin, bits))
    blob.add(f"{name}.weight:scale", _as_f32_np(wq.scale))
    blob.add(f"{name}.weight:zero_point", _as_f32_np(wq.zero_point))
    aq = act_quantizer(m)
    return {
        "bits": bits, "qmin": qmin, "qmax": qmax, "axis": int(wq.axis),
        "symmetric": bool(wq.symmetric), "shape": list(float_weight(m).shape),
        "weight_mode": getattr(wq, "mode", "nearest"),
        "act": None if aq is None else {"bits": int(aq.bits),
                                         "symmetric": bool(aq.symmetric),
                                         "mode": getattr(aq, "mode", "fixed"),
                                         "enabled": bool(getattr(aq, "enabled", True))},
    }


def _add_other_tensors(blob: _Blob, model: nn.Module, skip_ptrs: set[int], half: bool) -> int:
    """Add every state_dict tensor not packed (nor an AdaRound variable) to `blob`; bytes."""
    total = 0
    for key, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in skip_ptrs and t.numel() > 0:
            continue
        if key.endswith(".alpha") and ".parametrizations.weight." in key:
            continue  # AdaRound variables: hard rounding already in the codes
        arr = t.detach().cpu()
        if half and arr.is_floating_point():
            arr = arr.half()
        total += blob.add(key, arr.contiguous().numpy())
    return total


def _check_bits_match(layers: Sequence[tuple[str, nn.Module]], cfg: BitConfig) -> None:
    wb = cfg.weight_bits
    have = {n: int(weight_quantizer(m).bits) for n, m in layers}
    unknown = sorted(set(wb) - set(have))
    if unknown:
        raise ValueError(f"bit_config names layers that are not quantized in the model: "
                         f"{unknown}; quantized layers: {sorted(have)}")
    wrong = {n: (int(b), have[n]) for n, b in wb.items() if int(b) != have[n]}
    if wrong:
        raise ValueError("bit_config bits differ from the model's quantizers (layer: "
                         f"(config, model)): {wrong}")


# ============================================================================ reading and checks
def read_packed_header(path: PathLike, *, data: bool = True) -> tuple[dict, int]:
    """(header dict, byte offset of the data blob) of a packed checkpoint, after checking the
    magic, header checksum, JSON, format/version and array bounds, and with `data` the data
    length and checksum too (False: for a caller that loads the file next, which checks them;
    version-1 files carry no checksums: only their structure is checked).

    Raises:
        ValueError: one line naming the file, what is wrong and the fix.
    """
    with open(path, "rb") as f:
        header, start = _read_header(f, path)
        if data:
            _check_data(path, header, *_sha256_of_rest(f))
    return header, start


def _name(path: PathLike) -> str:
    return repr(os.fspath(path))


def _corrupted(path: PathLike, what: str) -> ValueError:
    """The one-line error for a damaged file: ``'<path>' is corrupted ...: <what>; re-export``."""
    return ValueError(f"{_name(path)} is corrupted or truncated: {what}; {_REEXPORT}")


def _read_header(f: BinaryIO, path: PathLike) -> tuple[dict, int]:
    """Read and check everything before the data blob of the open file `f`; (header, offset of
    the data blob in bytes)."""
    size = os.fstat(f.fileno()).st_size
    magic = f.read(len(MAGIC))
    version = _magic_version(path, magic, size)
    fixed = len(MAGIC) + LENGTH_BYTES + (DIGEST_BYTES if version >= 2 else 0)
    if size < fixed:
        raise _corrupted(path, f"the file has {size} bytes, fewer than the {fixed} of the "
                               "fixed-size preamble")
    length_field = f.read(LENGTH_BYTES)
    (n,) = struct.unpack("<Q", length_field)
    digest = f.read(DIGEST_BYTES) if version >= 2 else b""
    if fixed + n > size:
        raise _corrupted(path, f"the header length field says {n} bytes, but only "
                               f"{size - fixed} bytes follow it")
    head = f.read(n)
    if version >= 2 and hashlib.sha256(magic + length_field + head).digest() != digest:
        raise _corrupted(path, "the header checksum does not match")
    header = _parse_header(path, head)
    _check_header(path, header, version, size - fixed - n)
    return header, fixed + n


def _magic_version(path: PathLike, magic: bytes, size: int) -> int:
    """Format version of the file from its first 8 bytes (1 or 2); ValueError otherwise."""
    if magic == MAGIC:
        return PACKED_VERSION
    if magic == MAGIC_V1:
        return 1
    if size == 0:
        raise ValueError(f"{_name(path)} is empty (0 bytes), not an ompq packed checkpoint; "
                         f"{_REEXPORT}")
    tail = magic[len(MAGIC) - 2:]
    if magic[:len(MAGIC) - 2] == MAGIC[:-2] and tail.isdigit() and int(tail) > PACKED_VERSION:
        raise ValueError(f"{_name(path)} is an ompq packed checkpoint of format version "
                         f"{int(tail)}, newer than this ompq reads (<= {PACKED_VERSION}); "
                         f"upgrade ompq, or {_REEXPORT} if the file is corrupted")
    raise ValueError(f"{_name(path)} is not an ompq packed checkpoint, or its first bytes are "
                     f"corrupted (magic {magic!r}, expected {MAGIC!r} or {MAGIC_V1!r}); "
                     f"{_REEXPORT}")


def _parse_header(path: PathLike, head: bytes) -> dict:
    """The JSON header object; ValueError naming the file when it is not valid JSON."""
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupted(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupted(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header


def _check_header(path: PathLike, header: dict, version: int, data_bytes: int) -> None:
    """Check the header's format, version, sections and array bounds against the `data_bytes`
    bytes that follow it."""
    if header.get("format") != PACKED_FORMAT or header.get("version") != version:
        raise _corrupted(path, f"its magic says {PACKED_FORMAT} version {version} but the "
                               f"header says {header.get('format')!r} version "
                               f"{header.get('version')!r}")
    for key in ("layers", "module_types", "arrays") + (("data",) if version >= 2 else ()):
        if not isinstance(header.get(key), dict):
            raise _corrupted(path, f"the header's {key!r} section is missing or not an object")
    if version >= 2:
        expected = header["data"].get("nbytes")
        if expected != data_bytes:
            raise _corrupted(path, f"expected {expected} bytes of data, found {data_bytes}")
    for key, entry in header["arrays"].items():
        _check_array(path, key, entry, data_bytes)


def _check_array(path: PathLike, key: str, entry: Any, data_bytes: int) -> None:
    """One array entry: a plain dtype, a shape matching its byte count, inside the data blob."""
    try:
        dtype = np.dtype(entry["dtype"])
        shape = [int(d) for d in entry["shape"]]
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupted(path, f"array {key!r} has an invalid entry ({err!r})") from None
    if dtype.hasobject or min(shape, default=0) < 0 \
            or nbytes != int(np.prod(shape)) * dtype.itemsize:
        raise _corrupted(path, f"array {key!r}: {nbytes} bytes do not hold shape {shape} of "
                               f"{dtype}")
    if offset < 0 or offset + nbytes > data_bytes:
        raise _corrupted(path, f"array {key!r} lies at bytes [{offset}, {offset + nbytes}), "
                               f"outside the {data_bytes} bytes of data")


def _sha256_of_rest(f: BinaryIO, chunk: int = 2 ** 20) -> tuple[int, str]:
    """(bytes, SHA-256 hex digest) of what is left in `f`, read `chunk` bytes at a time."""
    h, n = hashlib.sha256(), 0
    while block := f.read(chunk):
        h.update(block)
        n += len(block)
    return n, h.hexdigest()


def _check_data(path: PathLike, header: dict, nbytes: int, sha256: str) -> None:
    """Compare the data blob's length (bytes) and SHA-256 with the header (version ≥ 2)."""
    if header["version"] < 2:
        return
    expected = header["data"]
    if nbytes != expected["nbytes"]:
        raise _corrupted(path, f"expected {expected['nbytes']} bytes of data, found {nbytes}")
    if sha256 != expected.get("sha256"):
        raise _corrupted(path, f"the data checksum does not match ({nbytes} bytes of data)")


def read_packed(path: PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a packed checkpoint, read once and verified as `read_packed_header`
    verifies it (a corrupted or truncated file raises a one-line ValueError naming it).

    `arrays` maps names to writable numpy arrays: per quantized layer ``<layer>.weight:packed``
    (uint8, the codes ``u = q − qmin`` LSB-first over the flattened weight, see `pack_bits`),
    ``<layer>.weight:scale`` and ``<layer>.weight:zero_point`` (fp32, per output channel); every
    other tensor of the saved model's `state_dict` under its key. Nothing is dequantized.
    """
    with open(path, "rb") as f:
        header, _ = _read_header(f, path)
        raw = f.read()
    _check_data(path, header, len(raw), hashlib.sha256(raw).hexdigest())
    return header, _read_arrays(raw, header)


def _read_arrays(raw: bytes, header: dict) -> dict[str, np.ndarray]:
    """The arrays of the (checked) header from the data blob `raw`, as writable copies."""
    out = {}
    for key, e in header["arrays"].items():
        buf = raw[e["offset"]:e["offset"] + e["nbytes"]]
        out[key] = np.frombuffer(buf, dtype=np.dtype(e["dtype"])).reshape(e["shape"]).copy()
    return out


def materialise(model_factory_or_model: Union[nn.Module, Callable[[], nn.Module], str]
                ) -> nn.Module:
    """The model itself, the zoo model of that name (untrained weights) or what the callable
    returns: the architecture a packed checkpoint is loaded into."""
    if isinstance(model_factory_or_model, nn.Module):
        return model_factory_or_model
    if isinstance(model_factory_or_model, str):
        from . import zoo
        return zoo.load(model_factory_or_model, pretrained=False)
    if callable(model_factory_or_model):
        model = model_factory_or_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model factory returned {type(model).__name__}, not an nn.Module")
        return model
    raise TypeError("load_packed needs an nn.Module, a zoo model name or a callable returning one; "
                    f"got {type(model_factory_or_model).__name__}")


def replay_bn_folding(model: nn.Module, header: dict) -> None:
    """Replace, in place, every BatchNorm of `model` that the checkpoint's `header` records as
    an Identity (folded into its layer before saving) by an `nn.Identity`."""
    current = dict(model.named_modules())
    for name, tname in header["module_types"].items():
        if tname == "Identity" and name in current and isinstance(current[name], BN_TYPES):
            set_submodule(model, name, nn.Identity())


def _rebuild_structure(model: nn.Module, header: dict) -> None:
    """Replay BN folding (BN -> Identity) and swap layers for quantized ones, as saved."""
    replay_bn_folding(model, header)
    current = dict(model.named_modules())
    missing = [n for n in header["layers"] if n not in current]
    if missing:
        raise ValueError(f"the packed checkpoint has quantized layers the model lacks: {missing}; "
                         f"pass the same architecture it was saved from ({header.get('model')})")
    biased = set(header.get("biased", []))
    for name, meta in header["layers"].items():
        mod = current[name]
        if weight_quantizer(mod) is None:
            act = meta["act"]
            scheme = QuantScheme(weight_init="minmax", weight_symmetric=meta["symmetric"],
                                 act_symmetric=bool(act and act["symmetric"]))
            attach_quantizers(mod, name, meta["bits"], None if act is None else act["bits"],
                              scheme)
        if name in biased and mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(float_weight(mod).size(0), dtype=float_weight(mod).dtype,
                                                device=float_weight(mod).device))


@stage("loading the packed checkpoint")
@torch.no_grad()
def load_packed(path: PathLike, model_factory_or_model: Union[nn.Module, Callable[[], nn.Module],
                str], *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a packed checkpoint into a model of the architecture it was saved from.

    Args:
        path: file written by `save_packed` (read once; verified as in `read_packed_header`:
            a corrupted or truncated file raises a one-line ValueError naming it).
        model_factory_or_model: the float model (modified in place), an already quantized model
            of the same structure, a zoo name, or a callable returning the float model. BN
            folding and quantized layers are recreated as saved.
        device: where to put the model (default: CPU).

    Returns:
        The fake-quant model in eval mode; its outputs equal the saved model's exactly (fp32).
    """
    header, arrays = read_packed(path)
    model = materialise(model_factory_or_model).cpu()
    _rebuild_structure(model, header)
    state = {k: torch.from_numpy(v) for k, v in arrays.items() if ":" not in k}
    ref_sd = model.state_dict()
    state = {k: v.to(ref_sd[k].dtype) if k in ref_sd else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"packed checkpoint tensors the model does not have: "
                         f"{result.unexpected_keys[:10]}; pass the architecture it was saved from")
    modules = dict(model.named_modules())
    for name, meta in header["layers"].items():
        _restore_layer(name, modules[name], meta, arrays)
    allowed = {f"{n}.parametrizations.weight.original" for n in header["layers"]}
    allowed |= {f"{n}.parametrizations.weight.0.{p}" for n in header["layers"]
                for p in ("scale", "zero_point", "alpha")}
    left = [k for k in result.missing_keys if k not in allowed]
    if left:
        raise ValueError(f"the model has tensors the packed checkpoint lacks: {left[:10]}; "
                         "pass the architecture it was saved from")
    model.eval()
    return model.to(device) if device is not None else model


def _restore_layer(name: str, mod: nn.Module, meta: dict, arrays: Mapping[str, np.ndarray]
                   ) -> None:
    wq = weight_quantizer(mod)
    if int(wq.bits) != meta["bits"] or int(wq.qmin) != meta["qmin"]:
        raise ValueError(f"layer {name!r}: the model's quantizer has {wq.bits} bits / qmin "
                         f"{wq.qmin}, the checkpoint {meta['bits']} / {meta['qmin']}")
    shape = meta["shape"]
    weight = float_weight(mod)
    if list(weight.shape) != shape:
        raise ValueError(f"layer {name!r}: weight shape {list(weight.shape)} != saved {shape}")
    count = int(np.prod(shape))
    stored, need = arrays[f"{name}.weight:packed"].size, -(-count * meta["bits"] // 8)
    if stored != need:
        raise ValueError(f"layer {name!r}: the checkpoint holds {stored} bytes of packed weights, "
                         f"{need} expected for shape {shape} at {meta['bits']} bits")
    q = unpack_bits(arrays[f"{name}.weight:packed"], meta["bits"], count) + meta["qmin"]
    scale = torch.from_numpy(arrays[f"{name}.weight:scale"]).float()
    zp = torch.from_numpy(arrays[f"{name}.weight:zero_point"]).float()
    if hasattr(wq, "alpha") and wq.alpha is not None:
        wq.alpha = None
    wq.scale.data = scale.reshape(wq.scale.shape).to(wq.scale.dtype).clone()
    wq.zero_point.data = zp.reshape(wq.zero_point.shape).clone()
    qt = torch.from_numpy(q.astype(np.float32)).reshape(shape)
    bshape = [1] * len(shape)
    bshape[meta["axis"]] = -1
    w = (qt - zp.reshape(bshape)) * scale.reshape(bshape)
    weight.data = w.to(weight.dtype)
    mode = meta.get("weight_mode", "nearest")
    wq.set_mode("nearest" if mode == "adaround" else mode)
    act = meta.get("act")
    aq = act_quantizer(mod)
    if act is not None and aq is not None:
        aq.observing = False
        aq.enabled = act.get("enabled", True)
        aq.set_mode(act.get("mode", "fixed"))
