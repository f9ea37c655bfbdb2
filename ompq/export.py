"""Export quantized models: a bit-packed checkpoint, ONNX with QDQ nodes, and bit-config interop.

1. **Packed checkpoint** (`save_packed` / `load_packed`). One file::

       b"OMPQPK01" | uint64 little-endian header length | header (UTF-8 JSON) | data blob

   The header lists every stored array (name, dtype, shape, byte offset, byte length in the blob),
   the layer bit-widths and grids, the module types (so BatchNorm folding is replayed on load) and
   the BitConfig. Each quantized layer's integer weights are stored as unsigned codes
   ``u = q - qmin`` in ``[0, 2**bits - 1]``, packed at exactly ``bits`` bits per weight into a
   uint8 stream, least significant bit first (``numpy.packbits(..., bitorder="little")``), each
   layer padded to a whole byte. Per-channel scales and zero points are fp32. Every other tensor of
   the model's `state_dict` (biases, BatchNorm statistics, activation-quantizer ranges) keeps its
   dtype (fp32; ``half=True`` stores floating tensors as fp16 at the price of exactness).

   *Size accounting*: file bytes = packed weight bytes + overhead, where overhead = the 16 bytes of
   magic and length + the JSON header + scales/zero points + the other tensors. The packed weight
   bytes equal the BitConfig size ``Σ params·bits / 8`` up to < 1 byte of padding per layer.
   `PackedInfo` reports all parts; `PackedInfo.within(0.05)` checks
   ``|file − (BitConfig bytes + overhead)| ≤ 5 %``.

   `load_packed` rebuilds the fake-quant model; its outputs equal the saved model's exactly
   (weights are restored as ``(q − zp)·scale``, which the nearest-rounding quantizer maps back
   to ``q``).

2. **ONNX** (`export_onnx`, `check_onnx`): the float graph is exported with the TorchScript
   exporter (``dynamo=False``) while every weight quantizer is replaced by a
   ``DequantizeLinear`` of an int8/uint8 initialiser (per output channel, ``axis`` = the
   quantizer's axis; INT4/UINT4 initialisers with ``int4=True`` at opset ≥ 21 for ≤ 4-bit layers)
   and every activation quantizer by ``QuantizeLinear → Clip(qmin, qmax) → DequantizeLinear``
   (per tensor; the Clip enforces grids narrower than 8 bits). The result runs in onnxruntime.

3. **Interop** (`to_hawq_bit_config`, `from_hawq_bit_config`, `to_layer_json`, `from_layer_json`,
   `write_layer_json`, `read_layer_json`).

   HAWQ-V3 ``bit_config`` dicts map quantization-module names to bits, e.g.
   ``{"quant_input": 8, "quant_init_block_convbn": 8, "stage1.unit1.quant_act": 4,
   "stage1.unit1.quant_convbn1": 4, ...}``: a weight key holds that layer's weight bits, an
   activation key (``quant_act*`` / ``*_act``) the bits of the activation that feeds the next
   layer. ompq's mapping, in layer (execution) order:

   - ``"<layer>"`` → the layer's weight bits (layer = module path, e.g. ``layer1.0.conv1``);
   - ``"<layer>_act"`` → the bits of that layer's *input* activation (``act_bits[layer]``);
   - ``"quant_input"`` → the first layer's input bits (the network input), also kept as
     ``"<first>_act"``.

   `from_hawq_bit_config` reads this form, and native HAWQ names through ``name_map`` (HAWQ name →
   ompq layer name; an act key maps to the layer whose input it quantizes). Keys ending in
   ``"_act"``, or whose last component starts with ``"quant_act"``, are activation keys.
   The plain per-layer JSON is ``{"layer": {"w_bits": 4, "a_bits": 8}, ...}``.
"""
from __future__ import annotations

import copy
import io
import json
import os
import struct
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import quantizers as qz

PathLike = Union[str, os.PathLike]
MAGIC = b"OMPQPK01"
PACKED_FORMAT = "ompq.Packed"
PACKED_VERSION = 1
MIB = 2 ** 20
_LEGACY_MAX_OPSET = 20


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


# ============================================================================ helpers
def _quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module with a weight quantizer (execution order not needed)."""
    return [(n, m) for n, m in model.named_modules()
            if getattr(m, "weight_quantizer", None) is not None and hasattr(m, "weight")]


def _config_dict(bit_config: Any) -> Optional[dict]:
    if bit_config is None:
        return None
    if isinstance(bit_config, Mapping):
        return dict(bit_config)
    if hasattr(bit_config, "to_json"):
        return json.loads(bit_config.to_json())
    raise TypeError(f"bit_config must be a BitConfig or its JSON dict, got "
                    f"{type(bit_config).__name__}")


def _codes(name: str, m: nn.Module) -> tuple[np.ndarray, int, int]:
    """Integer weight codes of a quantized layer, with its qmin/qmax (checked)."""
    wq = m.weight_quantizer
    if getattr(wq, "mode", "nearest") == "adaround" and getattr(wq, "soft", False):
        raise ValueError(f"layer {name!r}: weight quantizer is in soft AdaRound mode; finish "
                         "PTQ (it bakes the rounding) or call weight_quantizer.bake_adaround"
                         "(layer.weight) before exporting")
    q = m.int_weight() if hasattr(m, "int_weight") else wq.int_weight(m.weight)
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
    `overhead_bytes`: everything else in the file = `header_bytes` (magic, length and JSON
    metadata) + `scale_bytes` (fp32 scales and zero points) + `other_tensor_bytes` (biases,
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


# ============================================================================ packed checkpoint
def save_packed(model: nn.Module, path: PathLike, bit_config: Any = None, *,
                half: bool = False) -> PackedInfo:
    """Write the fake-quant `model` as a bit-packed checkpoint at `path` (see module docstring).

    Args:
        model: a model quantized with `ompq.quantizers.quantize_` / `ptq` / `qat`.
        bit_config: its BitConfig (or JSON dict); when given, its weight bits must equal the
            quantizers' bits, and its ``size_mb`` is the reference for the size check.
        half: store non-quantized floating tensors as fp16 (smaller, no longer exact).

    Returns:
        PackedInfo with the file size and its parts (bytes).
    """
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("save_packed: the model has no quantized layers (modules with a "
                         "weight_quantizer); quantize it with ompq.quantizers.quantize_ or ompq.ptq")
    cfg = _config_dict(bit_config)
    if cfg is not None:
        _check_bits_match(layers, cfg)
    blob, meta_layers = _Blob(), {}
    weight_bytes = scale_bytes = 0
    skip_ptrs: set[int] = set()
    for name, m in layers:
        codes, qmin, qmax = _codes(name, m)
        wq = m.weight_quantizer
        bits = int(wq.bits)
        packed = pack_bits(codes - qmin, bits)
        weight_bytes += blob.add(f"{name}.weight:packed", packed)
        scale_bytes += blob.add(f"{name}.weight:scale", _as_f32_np(wq.scale))
        scale_bytes += blob.add(f"{name}.weight:zero_point", _as_f32_np(wq.zero_point))
        skip_ptrs.update({m.weight.data_ptr(), wq.scale.data_ptr(), wq.zero_point.data_ptr()})
        aq = getattr(m, "act_quantizer", None)
        meta_layers[name] = {
            "bits": bits, "qmin": qmin, "qmax": qmax, "axis": int(wq.axis),
            "symmetric": bool(wq.symmetric), "shape": list(m.weight.shape),
            "weight_mode": getattr(wq, "mode", "nearest"),
            "act": None if aq is None else {"bits": int(aq.bits),
                                             "symmetric": bool(aq.symmetric),
                                             "mode": getattr(aq, "mode", "fixed"),
                                             "enabled": bool(getattr(aq, "enabled", True))},
        }
    other_bytes = 0
    for key, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in skip_ptrs and t.numel() > 0:
            continue
        if key.endswith(".alpha") and ".weight_quantizer" in key:
            continue  # AdaRound variables: hard rounding already in the codes
        arr = t.detach().cpu()
        if half and arr.is_floating_point():
            arr = arr.half()
        other_bytes += blob.add(key, arr.contiguous().numpy())
    header = {
        "format": PACKED_FORMAT, "version": PACKED_VERSION,
        "model": type(model).__name__,
        "layers": meta_layers,
        "module_types": {n: type(mod).__name__ for n, mod in model.named_modules() if n},
        "biased": [n for n, m in layers if getattr(m, "bias", None) is not None],
        "bit_config": cfg,
        "arrays": blob.entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        f.write(blob.buf.getvalue())
    if cfg is not None and cfg.get("size_mb") is not None:
        cfg_bytes = float(cfg["size_mb"]) * MIB
    else:
        cfg_bytes = sum(int(np.prod(l["shape"])) * l["bits"] / 8 for l in meta_layers.values())
    return PackedInfo(path=str(path), file_bytes=os.path.getsize(path), weight_bytes=weight_bytes,
                      bitconfig_bytes=cfg_bytes, header_bytes=len(MAGIC) + 8 + len(head),
                      scale_bytes=scale_bytes, other_tensor_bytes=other_bytes,
                      layers=len(meta_layers))


def _check_bits_match(layers: Sequence[tuple[str, nn.Module]], cfg: Mapping) -> None:
    wb = cfg.get("weight_bits") or {}
    have = {n: int(m.weight_quantizer.bits) for n, m in layers}
    unknown = sorted(set(wb) - set(have))
    if unknown:
        raise ValueError(f"bit_config names layers that are not quantized in the model: "
                         f"{unknown}; quantized layers: {sorted(have)}")
    wrong = {n: (int(b), have[n]) for n, b in wb.items() if int(b) != have[n]}
    if wrong:
        raise ValueError("bit_config bits differ from the model's quantizers (layer: "
                         f"(config, model)): {wrong}")


def read_packed_header(path: PathLike) -> tuple[dict, int]:
    """(header dict, byte offset of the data blob) of a packed checkpoint; checks the format."""
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise ValueError(f"{str(path)!r} is not an ompq packed checkpoint (magic {magic!r}, "
                             f"expected {MAGIC!r}); write one with ompq.export.save_packed")
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode())
    if header.get("format") != PACKED_FORMAT or int(header.get("version", 0)) > PACKED_VERSION:
        raise ValueError(f"{str(path)!r}: unsupported packed format/version "
                         f"{header.get('format')!r} v{header.get('version')}; this ompq reads "
                         f"{PACKED_FORMAT} v<={PACKED_VERSION}")
    return header, len(MAGIC) + 8 + n


def _read_arrays(path: PathLike, header: dict, start: int) -> dict[str, np.ndarray]:
    raw = Path(path).read_bytes()[start:]
    out = {}
    for key, e in header["arrays"].items():
        buf = raw[e["offset"]:e["offset"] + e["nbytes"]]
        out[key] = np.frombuffer(buf, dtype=np.dtype(e["dtype"])).reshape(e["shape"]).copy()
    return out


def _materialise(model_factory_or_model: Union[nn.Module, Callable[[], nn.Module], str]
                 ) -> nn.Module:
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


def _rebuild_structure(model: nn.Module, header: dict) -> None:
    """Replay BN folding (BN -> Identity) and swap layers for quantized ones, as saved."""
    types = header["module_types"]
    current = dict(model.named_modules())
    for name, tname in types.items():
        if tname == "Identity" and name in current and isinstance(current[name], qz._BN_TYPES):
            qz._set_submodule(model, name, nn.Identity())
    current = dict(model.named_modules())
    missing = [n for n in header["layers"] if n not in current]
    if missing:
        raise ValueError(f"the packed checkpoint has quantized layers the model lacks: {missing}; "
                         f"pass the same architecture it was saved from ({header.get('model')})")
    biased = set(header.get("biased", []))
    for name, meta in header["layers"].items():
        mod = current[name]
        if getattr(mod, "weight_quantizer", None) is None:
            act = meta["act"]
            mod = qz.to_quant_module(mod, meta["bits"], None if act is None else act["bits"],
                                     weight_init="minmax", weight_symmetric=meta["symmetric"],
                                     act_symmetric=bool(act and act["symmetric"]), name=name)
            qz._set_submodule(model, name, mod)
        if name in biased and mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.weight.size(0), dtype=mod.weight.dtype,
                                                device=mod.weight.device))


@torch.no_grad()
def load_packed(path: PathLike, model_factory_or_model: Union[nn.Module, Callable[[], nn.Module],
                str], *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Load a packed checkpoint into a model of the architecture it was saved from.

    Args:
        path: file written by `save_packed`.
        model_factory_or_model: the float model (modified in place), an already quantized model
            of the same structure, a zoo name, or a callable returning the float model. BN
            folding and quantized layers are recreated as saved.
        device: where to put the model (default: CPU).

    Returns:
        The fake-quant model in eval mode; its outputs equal the saved model's exactly (fp32).
    """
    header, start = read_packed_header(path)
    arrays = _read_arrays(path, header, start)
    model = _materialise(model_factory_or_model).cpu()
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
    allowed = {f"{n}.weight" for n in header["layers"]}
    allowed |= {f"{n}.weight_quantizer.{p}" for n in header["layers"]
                for p in ("scale", "zero_point", "alpha")}
    left = [k for k in result.missing_keys if k not in allowed]
    if left:
        raise ValueError(f"the model has tensors the packed checkpoint lacks: {left[:10]}; "
                         "pass the architecture it was saved from")
    model.eval()
    return model.to(device) if device is not None else model


def _restore_layer(name: str, mod: nn.Module, meta: dict, arrays: Mapping[str, np.ndarray]
                   ) -> None:
    wq = mod.weight_quantizer
    if int(wq.bits) != meta["bits"] or int(wq.qmin) != meta["qmin"]:
        raise ValueError(f"layer {name!r}: the model's quantizer has {wq.bits} bits / qmin "
                         f"{wq.qmin}, the checkpoint {meta['bits']} / {meta['qmin']}")
    shape = meta["shape"]
    if list(mod.weight.shape) != shape:
        raise ValueError(f"layer {name!r}: weight shape {list(mod.weight.shape)} != saved {shape}")
    count = int(np.prod(shape))
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
    mod.weight.data = w.to(mod.weight.dtype)
    mode = meta.get("weight_mode", "nearest")
    wq.set_mode("nearest" if mode == "adaround" else mode)
    act = meta.get("act")
    aq = getattr(mod, "act_quantizer", None)
    if act is not None and aq is not None:
        aq.observing = False
        aq.enabled = act.get("enabled", True)
        aq.set_mode(act.get("mode", "fixed"))


# ============================================================================ ONNX
_ONNX_INT = {  # (signed, container bits) -> torch dtype of the QDQ integer tensors
    (True, 8): torch.int8, (False, 8): torch.uint8,
    (True, 16): torch.int16, (False, 16): torch.uint16,
}


def _container(qmin: int, qmax: int, opset: int, what: str) -> torch.dtype:
    signed = qmin < 0
    width = 8 if (qmin >= -128 and qmax <= 127) or (qmin >= 0 and qmax <= 255) else 16
    if width == 8 and not signed and qmax > 255:
        width = 16
    if width == 16 and opset < 21:
        raise ValueError(f"{what}: grid [{qmin}, {qmax}] needs 16-bit QDQ, which ONNX allows "
                         f"from opset 21; pass opset=21 or use <= 8 bits")
    return _ONNX_INT[(signed, width)]


class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized weight `(q − zp)·scale`; ONNX: DequantizeLinear(int initialiser)."""

    @staticmethod
    def forward(ctx, w, codes, scale, zp, axis):  # noqa: D401
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.to(torch.float32) - zp.to(torch.float32).reshape(shape)) \
            * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w, codes, scale, zp, axis):
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=axis)


class _ActQDQ(torch.autograd.Function):
    """Forward: fake quantization; ONNX: QuantizeLinear → Clip(qmin, qmax) → DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax, dtype_code):
        return (torch.clamp(torch.round(x * (1.0 / scale)) + zp.float(), qmin, qmax)
                - zp.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, dtype_code):
        dtype = _DTYPE_CODES[dtype_code]
        q = g.op("QuantizeLinear", x, scale, zp)
        info = torch.iinfo(dtype)
        if qmin > info.min or qmax < info.max:
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zp)


_DTYPE_CODES = {0: torch.int8, 1: torch.uint8, 2: torch.int16, 3: torch.uint16}
_CODE_OF = {v: k for k, v in _DTYPE_CODES.items()}


class _OnnxWeight(nn.Module):
    def __init__(self, name: str, layer: nn.Module, opset: int) -> None:
        super().__init__()
        codes, qmin, qmax = _codes(name, layer)
        wq = layer.weight_quantizer
        dtype = _container(qmin, qmax, opset, f"layer {name!r} weights")
        self.axis = int(wq.axis)
        self.register_buffer("codes", torch.from_numpy(codes).to(dtype))
        self.register_buffer("scale", wq.scale.detach().float().reshape(-1).clone())
        self.register_buffer("zp", wq.zero_point.detach().round().to(dtype).reshape(-1).clone())

    def forward(self, w: Tensor) -> Tensor:
        return _WeightDQ.apply(w, self.codes, self.scale, self.zp, self.axis)


class _OnnxAct(nn.Module):
    def __init__(self, name: str, aq: nn.Module, opset: int) -> None:
        super().__init__()
        qmin, qmax = int(aq.qmin), int(aq.qmax)
        dtype = _container(qmin, qmax, opset, f"layer {name!r} input activations")
        self.qmin, self.qmax, self.code = qmin, qmax, _CODE_OF[dtype]
        self.register_buffer("scale", aq.scale.detach().float().reshape(()).clone())
        self.register_buffer("zp", aq.zero_point.detach().round().to(dtype).reshape(()).clone())

    def forward(self, x: Tensor) -> Tensor:
        return _ActQDQ.apply(x, self.scale, self.zp, self.qmin, self.qmax, self.code)


def _onnx_twin(model: nn.Module, opset: int) -> nn.Module:
    twin = copy.deepcopy(model).cpu().eval()
    layers = _quant_layers(twin)
    if not layers:
        raise ValueError("export_onnx: the model has no quantized layers; quantize it first "
                         "(ompq.quantizers.quantize_ / ompq.ptq)")
    for name, m in layers:
        m.weight_quantizer = _OnnxWeight(name, m, opset)
        aq = getattr(m, "act_quantizer", None)
        if aq is not None:
            if getattr(aq, "observing", False):
                raise ValueError(f"layer {name!r}: activation quantizer is still observing; "
                                 "calibrate (ompq.quantizers.calibrate_activations) first")
            m.act_quantizer = _OnnxAct(name, aq, opset) if getattr(aq, "enabled", True) \
                else nn.Identity()
    return twin


def _to_initialisers(model_proto, int4: bool) -> None:
    """Turn Constant nodes into initialisers, optionally pack ≤4-bit weight codes as INT4/UINT4,
    and drop unused initialisers (the float weights the DequantizeLinear nodes replace)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    consts = [n for n in graph.node if n.op_type == "Constant"]
    for node in consts:
        attr = next(a for a in node.attribute if a.name == "value")
        tensor = attr.t
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    if int4:
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            codes = numpy_helper.to_array(inits[node.input[0]])
            zp = numpy_helper.to_array(inits[node.input[2]])
            lo, hi = (-8, 7) if codes.dtype == np.int8 else (0, 15)
            if codes.dtype not in (np.int8, np.uint8) or codes.min() < lo or codes.max() > hi \
                    or zp.min() < lo or zp.max() > hi:
                continue
            et = onnx.TensorProto.INT4 if codes.dtype == np.int8 else onnx.TensorProto.UINT4
            for idx, arr in ((0, codes), (2, zp)):
                name = node.input[idx]
                new = helper.make_tensor(name, et, arr.shape, arr.reshape(-1).tolist())
                graph.initializer.remove(inits[name])
                graph.initializer.append(new)
                inits[name] = new
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    names = {i.name for i in graph.initializer}
    for inp in list(graph.input):
        if inp.name in names:
            graph.input.remove(inp)


def export_onnx(model: nn.Module, path: PathLike, example_input: Tensor, *, opset: int = 17,
                int4: bool = False, input_name: str = "input", output_name: str = "logits"
                ) -> dict:
    """Export a fake-quant model to ONNX with QuantizeLinear/DequantizeLinear nodes.

    Args:
        model: a quantized model (calibrated activation quantizers, baked AdaRound).
        path: output ``.onnx`` file.
        example_input: one batch (its batch dimension is exported as dynamic).
        opset: ONNX opset (≥ 13 for per-channel DequantizeLinear; 21 for INT4 / 16-bit).
        int4: store ≤ 4-bit weight codes as INT4/UINT4 initialisers (needs opset ≥ 21).

    Returns:
        ``{"path", "bytes", "opset", "qdq_nodes": {"QuantizeLinear": n, "DequantizeLinear": n},
        "int4_initialisers": n, "seconds"}``.
    """
    import onnx

    if opset < 13:
        raise ValueError(f"opset {opset} is too old: per-channel DequantizeLinear needs >= 13")
    if int4 and opset < 21:
        raise ValueError(f"int4=True needs opset >= 21 (INT4 QDQ types), got opset={opset}")
    t0 = time.perf_counter()
    twin = _onnx_twin(model, opset)
    buf = io.BytesIO()
    # The TorchScript exporter writes opsets <= 20; the ops it emits here (Conv, Gemm, QDQ, ...)
    # have the same semantics at 21, where only the QDQ types widen (INT4), so the graph is
    # exported at min(opset, 20) and then stamped with the requested opset.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(twin, (example_input.detach().cpu(),), buf, dynamo=False,
                          opset_version=min(opset, _LEGACY_MAX_OPSET), do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    _to_initialisers(proto, int4)
    onnx.checker.check_model(proto)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    counts = {op: sum(n.op_type == op for n in proto.graph.node)
              for op in ("QuantizeLinear", "DequantizeLinear")}
    n4 = sum(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
             for t in proto.graph.initializer)
    return {"path": str(path), "bytes": os.path.getsize(path), "opset": opset,
            "qdq_nodes": counts, "int4_initialisers": n4,
            "seconds": time.perf_counter() - t0}


def _batches(data: Any, batch_size: int, limit: Optional[int]) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        xs = data if limit is None else data[:limit]
        for i in range(0, xs.size(0), batch_size):
            yield xs[i:i + batch_size]
        return
    tensors = getattr(data, "tensors", None)
    if tensors is not None:  # TensorDataset: slice instead of stacking items one by one
        yield from _batches(tensors[0], batch_size, limit)
        return
    n = len(data) if limit is None else min(limit, len(data))
    for i in range(0, n, batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, n))]
        yield torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


@torch.no_grad()
def check_onnx(path: PathLike, model: nn.Module, data: Any, *, limit: Optional[int] = None,
               batch_size: int = 256, progress: bool = False, optimize: bool = True) -> dict:
    """Run an exported ONNX file in onnxruntime against the PyTorch fake-quant `model`.

    Args:
        data: a tensor of inputs or a Dataset (items `x` or `(x, y)`).
        limit: use the first `limit` samples (default: all).
        optimize: let onnxruntime fuse the QDQ pattern into its integer kernels (QLinearConv
            etc., as deployed; their requantization rounds differently from fp32 fake quant).
            False runs the graph op by op (float conv between QDQ pairs), which isolates the
            export itself from the integer kernels' rounding.

    Returns:
        ``{"n", "max_abs_diff", "mean_abs_diff", "top1_agreement" (%), "seconds"}``.
    """
    import onnxruntime as ort
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(2, os.cpu_count() or 1))
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    model = model.eval()
    device = next(model.parameters()).device
    n = agree = 0
    max_diff, sum_diff, numel = 0.0, 0.0, 0
    for x in tqdm(_batches(data, batch_size, limit), disable=not progress, desc="onnx check",
                  leave=False):
        ref = model(x.to(device)).float().cpu()
        out = torch.from_numpy(sess.run(None, {in_name: x.cpu().numpy().astype(np.float32)})[0])
        diff = (out - ref).abs()
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        numel += diff.numel()
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        n += x.size(0)
    return {"n": n, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / max(numel, 1),
            "top1_agreement": 100.0 * agree / max(n, 1), "seconds": time.perf_counter() - t0}


# ============================================================================ interop
def _bits_dicts(bit_config: Any) -> tuple[dict[str, int], dict[str, int]]:
    cfg = _config_dict(bit_config) or {}
    wb = cfg.get("weight_bits")
    if not isinstance(wb, Mapping):
        raise TypeError("expected a BitConfig (or its JSON dict with 'weight_bits')")
    return ({k: int(v) for k, v in wb.items()},
            {k: int(v) for k, v in (cfg.get("act_bits") or {}).items()})


def to_hawq_bit_config(bit_config: Any, *, input_key: bool = True) -> dict[str, int]:
    """HAWQ-V3-style ``bit_config`` dict of a BitConfig (mapping in the module docstring):
    ``{"quant_input": a0, "<layer>": w_bits, "<layer>_act": a_bits, ...}`` in layer order."""
    wb, ab = _bits_dicts(bit_config)
    out: dict[str, int] = {}
    names = list(wb)
    if input_key and names and names[0] in ab:
        out["quant_input"] = ab[names[0]]
    for n in names:
        out[n] = wb[n]
        if n in ab:
            out[f"{n}_act"] = ab[n]
    return out


def _is_act_key(key: str) -> bool:
    return key.endswith("_act") or key.rsplit(".", 1)[-1].startswith("quant_act")


def from_hawq_bit_config(d: Mapping[str, int], *, layer_names: Optional[Sequence[str]] = None,
                         name_map: Optional[Mapping[str, str]] = None, default_act_bits: int = 8,
                         ignore: Sequence[str] = ("quant_input", "quant_act_int32",
                                                  "quant_act_output", "quant_output")) -> Any:
    """BitConfig from a HAWQ-V3-style dict (see the module docstring for the key mapping).

    Args:
        d: key -> bits.
        layer_names: the model's layer names (execution order); every one must get weight bits,
            and keys naming other layers raise.
        name_map: HAWQ key -> ompq layer name (for native HAWQ module names).
        default_act_bits: activation bits of layers without an act key.
        ignore: HAWQ keys without an ompq counterpart (``quant_input`` sets the first layer's
            input bits when no ``<first>_act`` key exists).

    Returns:
        A BitConfig (proxy "custom", size/BOPs left 0: compute them with the model's layers).
    """
    name_map = dict(name_map or {})
    wb: dict[str, int] = {}
    ab: dict[str, int] = {}
    for key, bits in d.items():
        if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits < 1:
            raise ValueError(f"HAWQ bit_config[{key!r}] = {bits!r}: bits must be a positive int")
        if key in ignore and key not in name_map:
            continue
        if _is_act_key(key):
            layer = name_map.get(key, key[:-4] if key.endswith("_act") else key)
            ab[layer] = int(bits)
        else:
            wb[name_map.get(key, key)] = int(bits)
    if layer_names is not None:
        _check_names(wb, ab, layer_names, "HAWQ bit_config")
        wb = {n: wb[n] for n in layer_names}
    if "quant_input" in d and wb:
        ab.setdefault(next(iter(wb)), int(d["quant_input"]))
    ab = {n: ab.get(n, default_act_bits) for n in wb}
    return _make_config(wb, ab)


def _check_names(wb: Mapping[str, int], ab: Mapping[str, int], layer_names: Sequence[str],
                 what: str) -> None:
    known = set(layer_names)
    extra = sorted((set(wb) | set(ab)) - known)
    missing = [n for n in layer_names if n not in wb]
    if extra or missing:
        raise ValueError(f"{what} does not match the model's layers: unknown {extra}, "
                         f"missing weight bits for {missing}; valid layer names: {list(layer_names)}")


def _make_config(wb: dict[str, int], ab: dict[str, int]) -> Any:
    from .allocate import BitConfig

    return BitConfig(weight_bits=wb, act_bits=ab, importance={}, size_mb=0.0, bops_g=0.0,
                     status="IMPORTED", objective=0.0, method="import", proxy="custom",
                     budget={"size_mb": None, "bops_g": None}, search_seconds=0.0)


def to_layer_json(bit_config: Any) -> dict[str, dict[str, int]]:
    """Plain per-layer dict ``{"layer": {"w_bits": 4, "a_bits": 8}, ...}`` (layer order)."""
    wb, ab = _bits_dicts(bit_config)
    return {n: {"w_bits": b, "a_bits": ab.get(n, 8)} for n, b in wb.items()}


def from_layer_json(d: Mapping[str, Mapping[str, int]], *,
                    layer_names: Optional[Sequence[str]] = None, default_act_bits: int = 8) -> Any:
    """BitConfig from the plain per-layer dict (``a_bits`` optional, default 8)."""
    wb, ab = {}, {}
    for name, entry in d.items():
        if not isinstance(entry, Mapping) or "w_bits" not in entry:
            raise ValueError(f"layer {name!r}: expected {{'w_bits': int, 'a_bits': int}}, "
                             f"got {entry!r}")
        wb[name] = int(entry["w_bits"])
        ab[name] = int(entry.get("a_bits", default_act_bits))
    if layer_names is not None:
        _check_names(wb, ab, layer_names, "per-layer JSON")
        wb = {n: wb[n] for n in layer_names}
        ab = {n: ab[n] for n in layer_names}
    return _make_config(wb, ab)


def write_layer_json(bit_config: Any, path: PathLike) -> Path:
    """Write `to_layer_json(bit_config)` to `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_layer_json(bit_config), indent=1))
    return p


def read_layer_json(path: PathLike, **kwargs: Any) -> Any:
    """Read a plain per-layer JSON file into a BitConfig (kwargs as `from_layer_json`)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read per-layer bits JSON {str(path)!r}: {err}") from None
    return from_layer_json(d, **kwargs)
