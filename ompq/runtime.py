"""Quantized inference: layers whose weights stay bit-packed in memory and run from that form.

Each `PackedLayer` holds its layer's integer weight codes packed at the layer's own width
(2..8 bits, the row layout of `ompq.ops.pack_rows`: uint8 [C_out, ceil(K/8)·bits]), a fp32
scale and offset per output channel (w = scale·(u − offset)), the fp32 bias and the layer's
frozen input `ActQuantizer`. `PackedLinear` calls `ops.packed_linear` (no float weight is
kept); `PackedConv1d/2d/3d` and `PackedCustomLayer` (a Conv/Linear subclass with its own
forward) unpack into one reused fp32 scratch buffer per thread (`SCRATCH`). `convert` turns a
fake-quant model (`ompq.quantize_`, PTQ, QAT) into a runtime model;
`load` builds one from a packed checkpoint without dequantizing it. Inference only (no
autograd). Details: docs/DESIGN.md, "Runtime".
"""
from __future__ import annotations

import copy
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .layers import set_submodule
from .packed import materialise, read_packed, replay_bn_folding, unpack_bits, weight_codes
from .quantize import act_quantizer, layer_class, quant_layers, weight_quantizer
from .quantizers import ActQuantizer, WeightQuantizer
from .stages import stage

__all__ = ["SUPPORTED_BITS", "PackedWeight", "PackedLayer", "PackedLinear", "PackedConv",
           "PackedConv1d", "PackedConv2d", "PackedConv3d", "PackedCustomLayer", "packed_class",
           "pack_layer", "convert", "load", "Scratch", "SCRATCH", "shared_scratch", "memory_bytes"]

#: Weight widths the packed ops run (the row layout packs 8 codes into `bits` bytes).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
ModelSpec = Union[nn.Module, Callable[[], nn.Module], str]


def check_packed_width(bits: int, name: str) -> int:
    """`bits` when the runtime packs that width, else a ValueError naming the layer."""
    if int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"layer {name!r}: {bits}-bit weights; the runtime runs "
                         f"{SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}-bit weights; quantize this "
                         "layer at 8 bits or fewer")
    return int(bits)


# ============================================================================ packed weights
@dataclass
class PackedWeight:
    """One layer's weight in the runtime's row layout.

    `packed`: uint8 [C_out, ceil(K/8)·bits] (K = weight elements per output channel);
    `scale`, `offset`: fp32 [C_out], w[r, k] = scale[r]·(u[r, k] − offset[r]) with the codes
    u = q − qmin and offset = zero_point − qmin; `shape`: the float weight's shape.
    """

    packed: Tensor
    scale: Tensor
    offset: Tensor
    bits: int
    shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        """K: weight elements per output channel."""
        return math.prod(self.shape[1:])

    @classmethod
    def from_codes(cls, codes: Tensor, qmin: int, scale: Tensor, zero_point: Tensor,
                   bits: int, name: str = "layer") -> "PackedWeight":
        """Pack integer codes q (shape of the weight, in [qmin, qmin + 2**bits − 1]) with their
        per-output-channel scale and zero point."""
        bits = check_packed_width(bits, name)
        rows = (codes.reshape(codes.shape[0], -1).to(torch.int64) - int(qmin)).to(torch.int32)
        return cls(ops.pack_rows(rows.contiguous(), bits), _f32(scale),
                   _f32(zero_point) - float(qmin), bits, tuple(codes.shape))

    @classmethod
    def from_stream(cls, stream: np.ndarray, shape: tuple[int, ...], qmin: int,
                    scale: Tensor, zero_point: Tensor, bits: int,
                    name: str = "layer") -> "PackedWeight":
        """From a packed checkpoint's stream (`ompq.packed.pack_bits` of the flattened codes
        u = q − qmin). When K % 8 == 0 every row starts on a byte boundary and the stream is
        the row layout already; otherwise the codes are unpacked to integers and repacked per
        row (`ops.pack_rows`). No float weight is made."""
        bits = check_packed_width(bits, name)
        rows, k = int(shape[0]), math.prod(shape[1:])
        need = -(-rows * k * bits // 8)
        if stream.size != need:
            raise ValueError(f"layer {name!r}: the checkpoint holds {stream.size} bytes of packed "
                             f"weights, {need} expected for shape {list(shape)} at {bits} bits")
        if k % 8 == 0:
            packed = torch.from_numpy(np.ascontiguousarray(stream).reshape(rows, k * bits // 8))
        else:
            u = torch.from_numpy(unpack_bits(stream, bits, rows * k).reshape(rows, k))
            packed = ops.pack_rows(u.to(torch.int32), bits)
        return cls(packed, _f32(scale), _f32(zero_point) - float(qmin), bits, tuple(shape))

    def dequantize(self, out: Optional[Tensor] = None) -> Tensor:
        """The fp32 weight (shape `shape`), written into `out` ([C_out, K] fp32) when given."""
        if out is None:
            out = torch.empty(self.shape[0], self.in_features, device=self.packed.device)
        ops.unpack_rows(self.packed, self.bits, self.in_features, self.scale, self.offset, out)
        return out.view(self.shape)


class Scratch:
    """Growable fp32 buffers that packed convolutions unpack their weights into: one per thread
    and device, shared by every packed layer (a thread runs one layer at a time), so a model
    holds at most its largest layer's fp32 weight per thread. Not a registered buffer (never
    saved); copies and pickles refer to the same process-wide `SCRATCH`."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _buffers(self) -> dict:
        if not hasattr(self._local, "buffers"):
            self._local.buffers = {}
        return self._local.buffers

    def get(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """A contiguous fp32 [rows, cols] view of this thread's buffer on `device` (grown when
        too small)."""
        n, buffers = rows * cols, self._buffers()
        buf = buffers.get(device)
        if buf is None or buf.numel() < n:
            buffers[device] = None  # free the old buffer before allocating the new one
            buf = buffers[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(rows, cols)

    def tensors(self) -> list[Tensor]:
        """This thread's buffers (one per device used)."""
        return [b for b in self._buffers().values() if b is not None]

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._buffers().clear()

    @property
    def nbytes(self) -> int:
        """Bytes this thread's buffers hold now (0 before the first use)."""
        return sum(b.numel() * 4 for b in self.tensors())

    def __reduce__(self) -> tuple:
        return (shared_scratch, ())

    def __deepcopy__(self, memo: dict) -> "Scratch":
        return self


SCRATCH = Scratch()


def shared_scratch() -> Scratch:
    """The process-wide `Scratch` every packed layer uses."""
    return SCRATCH


def _f32(t: Tensor) -> Tensor:
    """A detached, contiguous fp32 copy of `t`, flattened (per-channel vectors)."""
    return t.detach().to(torch.float32).reshape(-1).clone()


def _float_bias(layer: nn.Module) -> Optional[Tensor]:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().to(torch.float32).clone()


# ============================================================================ layers
class PackedLayer(nn.Module):
    """Base of the runtime layers: buffers `packed` (uint8), `scale`, `offset` (fp32 [C_out]),
    optional `bias` (fp32); attributes `bits` and `weight_shape`; submodule `act_quantizer`
    (the layer's frozen input quantizer, or None for a floating-point input).

    Subclasses implement `from_layer(layer, weight, bias, act_quantizer)`, which reads the
    hyper-parameters (stride, padding, ...) of the layer they replace, and `forward`.
    """

    def __init__(self, weight: PackedWeight, bias: Optional[Tensor] = None,
                 act_quantizer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bits = int(weight.bits)
        self.weight_shape = tuple(int(d) for d in weight.shape)
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("bias", bias)
        self.add_module("act_quantizer", act_quantizer)
        self.scratch = SCRATCH  # where `unpacked_weight` writes (PackedLinear never does)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_layer(cls, layer: nn.Module, weight: PackedWeight, bias: Optional[Tensor],
                   act_quantizer: Optional[nn.Module]) -> "PackedLayer":
        """The packed layer of `layer`; each concrete class (PackedLinear, PackedConvNd,
        PackedCustomLayer) defines it. `pack_layer` picks the class for a layer."""
        raise TypeError(f"{cls.__name__} is abstract: use PackedLinear, PackedConv1d/2d/3d or "
                        "PackedCustomLayer (ompq.runtime.pack_layer picks the right one)")

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int, *, symmetric: bool = False,
                   init: str = "mse", name: str = "layer") -> "PackedLayer":
        """Quantize a float layer's weight as PTQ does (`WeightQuantizer`, per output channel,
        scale from `init`) and pack it; the input stays in floating point (no act quantizer)."""
        if weight_quantizer(layer) is not None:
            raise ValueError(f"layer {name!r} is already quantized; use from_quantized")
        w = layer.weight.detach()
        wq = WeightQuantizer(check_packed_width(bits, name), w.size(0), axis=0,
                             symmetric=symmetric)
        wq = wq.to(w.device)
        wq.init_scale(w, init)
        pw = PackedWeight.from_codes(wq.int_weight(w), wq.qmin, wq.scale, wq.zero_point, bits,
                                     name)
        return cls.from_layer(layer, pw, _float_bias(layer), None)

    @classmethod
    def from_quantized(cls, module: nn.Module, name: str = "layer") -> "PackedLayer":
        """From a layer quantized by `ompq.quantize_` (PTQ, QAT): its integer codes, scales,
        zero points, bias and a copy of its input quantizer. A soft AdaRound layer raises."""
        wq = weight_quantizer(module)
        if wq is None:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) is not quantized; "
                             "quantize it with ompq.quantize_ or use from_float")
        if wq.axis != 0:
            raise ValueError(f"layer {name!r}: per-channel axis {wq.axis}; the runtime packs "
                             "rows along the output channel (axis 0)")
        codes, qmin, _ = weight_codes(name, module)
        pw = PackedWeight.from_codes(torch.from_numpy(codes), qmin, wq.scale, wq.zero_point,
                                     wq.bits, name)
        aq = act_quantizer(module)
        return cls.from_layer(module, pw, _float_bias(module),
                              None if aq is None else copy.deepcopy(aq))

    # -- execution -----------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        """K: weight elements per output channel (Linear: in_features; conv: C_in/groups·k)."""
        return math.prod(self.weight_shape[1:])

    def packed_weight(self) -> PackedWeight:
        """This layer's weight as a `PackedWeight` (sharing the buffers)."""
        return PackedWeight(self.packed, self.scale, self.offset, self.bits, self.weight_shape)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the fake-quant layer sees it (its input quantizer, if any)."""
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def unpacked_weight(self) -> Tensor:
        """The fp32 weight (shape `weight_shape`), unpacked into this thread's scratch buffer
        (shared by every packed layer). Valid until the next layer unpacks."""
        out = self.scratch.get(self.weight_shape[0], self.in_features, self.packed.device)
        return self.packed_weight().dequantize(out)

    def extra_repr(self) -> str:
        return (f"weight_shape={list(self.weight_shape)}, bits={self.bits}, "
                f"bias={self.bias is not None}")


class PackedLinear(PackedLayer):
    """`nn.Linear` from packed weights: `ops.packed_linear` dequantizes on the fly (fp32
    accumulation); no float copy of the weight exists at any time. Input [..., in_features],
    output [..., out_features], fp32."""

    def __init__(self, weight: PackedWeight, bias: Optional[Tensor] = None,
                 act_quantizer: Optional[nn.Module] = None) -> None:
        if len(weight.shape) != 2:
            raise ValueError(f"PackedLinear needs a 2-D weight, got shape {list(weight.shape)}")
        super().__init__(weight, bias, act_quantizer)
        self.out_features = int(weight.shape[0])

    @classmethod
    def from_layer(cls, layer: nn.Module, weight: PackedWeight, bias: Optional[Tensor],
                   act_quantizer: Optional[nn.Module]) -> "PackedLinear":
        _expect(cls, layer)
        return cls(weight, bias, act_quantizer)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        return ops.packed_linear(x, self.packed, self.bits, self.in_features, self.scale,
                                 self.offset, self.bias)


def _explicit_padding(padding: Union[str, tuple[int, ...]], kernel_size: tuple[int, ...],
                      dilation: tuple[int, ...]) -> list[int]:
    """`F.pad` amounts (last dimension first) equal to a conv's `padding` ("same", "valid" or
    per-dimension ints), as `nn.ConvNd` computes them for a non-zero `padding_mode`."""
    out: list[int] = []
    for i in reversed(range(len(kernel_size))):
        if padding == "valid":
            out += [0, 0]
        elif padding == "same":
            total = dilation[i] * (kernel_size[i] - 1)
            out += [total // 2, total - total // 2]
        else:
            out += [padding[i], padding[i]]
    return out


class PackedConv(PackedLayer):
    """`nn.ConvNd` (exact class, grouped and depthwise too) from packed weights: each call
    unpacks into the layer's scratch (`unpacked_weight`) and runs `F.convNd` with the
    layer's stride, padding, dilation, groups and padding mode. Subclasses fix N."""

    conv_type: type = nn.Conv2d
    conv_fn: Callable[..., Tensor] = staticmethod(F.conv2d)

    def __init__(self, weight: PackedWeight, bias: Optional[Tensor] = None,
                 act_quantizer: Optional[nn.Module] = None, *, stride: tuple[int, ...],
                 padding: Union[str, tuple[int, ...]], dilation: tuple[int, ...], groups: int,
                 padding_mode: str = "zeros") -> None:
        super().__init__(weight, bias, act_quantizer)
        self.out_channels = int(weight.shape[0])
        self.in_channels = int(weight.shape[1]) * int(groups)
        self.kernel_size = tuple(int(k) for k in weight.shape[2:])
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.padding_mode = int(groups), padding_mode

    @classmethod
    def from_layer(cls, layer: nn.Module, weight: PackedWeight, bias: Optional[Tensor],
                   act_quantizer: Optional[nn.Module]) -> "PackedConv":
        _expect(cls, layer)
        return cls(weight, bias, act_quantizer, stride=tuple(layer.stride),
                   padding=layer.padding if isinstance(layer.padding, str)
                   else tuple(layer.padding), dilation=tuple(layer.dilation),
                   groups=layer.groups, padding_mode=layer.padding_mode)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        w = self.unpacked_weight()
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, _explicit_padding(padding, self.kernel_size, self.dilation),
                      mode=self.padding_mode)
            padding = 0
        return self.conv_fn(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}")


class PackedConv1d(PackedConv):
    conv_type = nn.Conv1d
    conv_fn = staticmethod(F.conv1d)


class PackedConv2d(PackedConv):
    conv_type = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)


class PackedConv3d(PackedConv):
    conv_type = nn.Conv3d
    conv_fn = staticmethod(F.conv3d)


class PackedCustomLayer(PackedLayer):
    """A Conv/Linear *subclass* with its own `forward` (or `_conv_forward`), e.g. TF-style
    "same" padding: submodule `layer` is a copy of the original module without its weight,
    bias and quantizers; each call unpacks the weight into the scratch buffer, hands it (and the
    bias) to `layer` as plain attributes and calls `layer` on the quantized input, so the
    class's own forward runs as in the fake-quant model."""

    def __init__(self, weight: PackedWeight, bias: Optional[Tensor],
                 act_quantizer: Optional[nn.Module], layer: nn.Module) -> None:
        super().__init__(weight, bias, act_quantizer)
        self.layer = layer

    @classmethod
    def from_layer(cls, layer: nn.Module, weight: PackedWeight, bias: Optional[Tensor],
                   act_quantizer: Optional[nn.Module]) -> "PackedCustomLayer":
        return cls(weight, bias, act_quantizer, _weightless_copy(layer))

    @torch.no_grad()
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = self.quantize_input(x)
        self.layer.weight = self.unpacked_weight()
        self.layer.bias = self.bias
        return self.layer(x, *args, **kwargs)


def _weightless_copy(layer: nn.Module) -> nn.Module:
    """A copy of `layer` of its own class, without parametrization, input quantizer, weight and
    bias (`weight` and `bias` become plain None attributes; a copied `quant_input_hook` then
    does nothing). The class is swapped rather than `remove_parametrizations` called: that
    would delete the `weight` property of the parametrized class, shared with `layer`."""
    inner = copy.deepcopy(layer)
    inner.__class__ = layer_class(layer)
    for attr in ("parametrizations", "weight", "bias", "act_quantizer"):
        if hasattr(inner, attr):
            delattr(inner, attr)
    inner.weight, inner.bias = None, None
    return inner


_STANDARD: tuple[tuple[type, type], ...] = ((nn.Linear, PackedLinear), (nn.Conv1d, PackedConv1d),
                                            (nn.Conv2d, PackedConv2d), (nn.Conv3d, PackedConv3d))


def packed_class(layer: nn.Module) -> type:
    """The runtime class replacing `layer`: PackedLinear / PackedConv1d/2d/3d for those classes
    and for subclasses that keep their forward; PackedCustomLayer for subclasses overriding
    `forward` or `_conv_forward`. TypeError for other modules."""
    cls = layer_class(layer)
    for base, packed_cls in _STANDARD:
        if issubclass(cls, base):
            own = any(getattr(cls, a, None) is not getattr(base, a, None)
                      for a in ("forward", "_conv_forward"))
            return PackedCustomLayer if own else packed_cls
    raise TypeError(f"{cls.__name__} is not a Conv1d/2d/3d or Linear layer")


def _expect(cls: type, layer: nn.Module) -> None:
    """TypeError unless `cls` is the runtime class of `layer` (`packed_class`), so that a
    subclass's own forward is never silently replaced by the base class's."""
    want = packed_class(layer)
    if want is not cls:
        raise TypeError(f"{cls.__name__} cannot run a {layer_class(layer).__name__}; use "
                        f"{want.__name__} (runtime.pack_layer picks it)")


def pack_layer(module: nn.Module, name: str = "layer") -> PackedLayer:
    """The runtime layer of a quantized layer (`packed_class(module).from_quantized`)."""
    return packed_class(module).from_quantized(module, name)


# ============================================================================ models
@torch.no_grad()
def convert(qmodel: nn.Module) -> nn.Module:
    """A copy of the fake-quant model `qmodel` (quantized by `ompq.quantize_`, PTQ or QAT) in
    which every quantized layer is a `PackedLayer`; other modules are copied as they are. The
    copy is in eval mode. A layer in soft AdaRound mode raises ValueError naming it."""
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("convert: the model has no quantized layers; quantize it with "
                         "ompq.quantize_, ompq.ptq or ompq.qat")
    for name, m in layers:
        weight_codes(name, m)  # refuses soft AdaRound before anything is copied
        check_packed_width(weight_quantizer(m).bits, name)
    model = copy.deepcopy(qmodel)
    for name, m in quant_layers(model):
        set_submodule(model, name, pack_layer(m, name))
    return model.eval()


@stage("loading the packed checkpoint")
@torch.no_grad()
def load(path: Union[str, os.PathLike], model: ModelSpec, *,
         device: Union[str, torch.device, None] = None) -> nn.Module:
    """The runtime model of a packed checkpoint (`ompq.packed.save_packed`), without a float
    copy of any quantized weight.

    Args:
        path: the checkpoint (verified: a corrupted or truncated file raises a one-line
            ValueError naming it).
        model: the float architecture it was saved from (modified in place: BatchNorms folded
            before saving become Identity, quantized layers become PackedLayers), a zoo name or
            a callable returning it.
        device: where to put the model (default: CPU).

    Raises:
        ValueError (one line, naming the layer): a checkpoint layer the model lacks or whose
        class or shape differs, a width outside SUPPORTED_BITS, tensors that do not match.
    """
    header, arrays = read_packed(path)
    model = materialise(model).cpu()
    if quant_layers(model):
        raise ValueError("runtime.load needs the float architecture; this model is already "
                         "quantized: use ompq.runtime.convert(model) instead")
    replay_bn_folding(model, header)
    modules = dict(model.named_modules())
    for name, meta in header["layers"].items():
        layer = _checked_layer(name, meta, modules, header)
        set_submodule(model, name, _layer_from_checkpoint(name, meta, layer, header, arrays))
    _load_tensors(model, header, arrays)
    model.eval()
    return model.to(device) if device is not None else model


def _checked_layer(name: str, meta: Mapping[str, Any], modules: Mapping[str, nn.Module],
                   header: Mapping[str, Any]) -> nn.Module:
    """The model's module for the checkpoint layer `name`; ValueError when it does not fit."""
    saved = header.get("model")
    layer = modules.get(name)
    if layer is None:
        raise ValueError(f"the checkpoint has layer {name!r}, which the model lacks; pass the "
                         f"architecture it was saved from ({saved})")
    want, have = header["module_types"].get(name), layer_class(layer).__name__
    if want != have:
        raise ValueError(f"layer {name!r} is a {have} in the model but a {want} in the "
                         f"checkpoint; pass the architecture it was saved from ({saved})")
    shape = list(getattr(layer, "weight").shape)
    if shape != list(meta["shape"]):
        raise ValueError(f"layer {name!r}: weight shape {shape} in the model, {meta['shape']} "
                         f"in the checkpoint; pass the architecture it was saved from ({saved})")
    if meta.get("axis", 0) != 0:
        raise ValueError(f"layer {name!r}: per-channel axis {meta['axis']}; the runtime packs "
                         "rows along the output channel (axis 0)")
    return layer


def _act_quantizer(meta: Optional[Mapping[str, Any]]) -> Optional[ActQuantizer]:
    """A frozen input quantizer as saved (its scale and range are loaded with the tensors)."""
    if meta is None:
        return None
    aq = ActQuantizer(int(meta["bits"]), symmetric=bool(meta["symmetric"]),
                      mode=meta.get("mode", "fixed"))
    aq.observing = False
    aq.enabled = bool(meta.get("enabled", True))
    return aq


def _layer_from_checkpoint(name: str, meta: Mapping[str, Any], layer: nn.Module,
                           header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                           ) -> PackedLayer:
    """The runtime layer of checkpoint layer `name` (bias and act ranges loaded later)."""
    bits = check_packed_width(meta["bits"], name)
    key = f"{name}.weight"
    pw = PackedWeight.from_stream(arrays[f"{key}:packed"], tuple(meta["shape"]), meta["qmin"],
                                  torch.from_numpy(arrays[f"{key}:scale"]),
                                  torch.from_numpy(arrays[f"{key}:zero_point"]), bits, name)
    biased = name in set(header.get("biased", []))
    bias = torch.zeros(pw.shape[0]) if biased else None
    return packed_class(layer).from_layer(layer, pw, bias, _act_quantizer(meta.get("act")))


def _load_tensors(model: nn.Module, header: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray]) -> None:
    """Load every stored tensor that is not a packed weight (biases, activation ranges, other
    layers, BatchNorms) into `model`; ValueError when the two do not match."""
    custom = {n for n, m in model.named_modules() if isinstance(m, PackedCustomLayer)}
    state = {_runtime_key(k, custom): torch.from_numpy(v) for k, v in arrays.items()
             if ":" not in k}
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint's tensors do not fit the model ({err}); pass the "
                         f"architecture it was saved from ({header.get('model')})") from None
    if result.unexpected_keys:
        raise ValueError(f"packed checkpoint tensors the model does not have: "
                         f"{result.unexpected_keys[:10]}; pass the architecture it was saved "
                         f"from ({header.get('model')})")
    made = {f"{n}.{b}" for n in header["layers"] for b in ("packed", "scale", "offset")}
    left = [k for k in result.missing_keys if k not in made]
    if left:
        raise ValueError(f"the model has tensors the packed checkpoint lacks: {left[:10]}; "
                         f"pass the architecture it was saved from ({header.get('model')})")


def _runtime_key(key: str, custom: set[str]) -> str:
    """A saved state_dict key as the runtime model names it: a PackedCustomLayer (names in
    `custom`) keeps the original module's own extra tensors under `<layer>.layer.`."""
    for name in custom:
        rest = key[len(name) + 1:] if key.startswith(f"{name}.") else None
        if rest is not None and rest != "bias" and not rest.startswith("act_quantizer."):
            return f"{name}.layer.{rest}"
    return key


def memory_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes `model` holds: `parameters`, `buffers` (each counted once), of the buffers
    `packed_weights` (the PackedLayers' uint8 codes), `scratch` (the unpacked fp32 weights of
    packed convolutions that have run) and `total` = parameters + buffers + scratch."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    layers = [m for m in model.modules() if isinstance(m, PackedLayer)]
    packed = sum(m.packed.numel() for m in layers)
    scratch = sum(s.nbytes for s in {id(m.scratch): m.scratch for m in layers}.values())
    return {"parameters": params, "buffers": buffers, "packed_weights": packed,
            "scratch": scratch, "total": params + buffers + scratch}
