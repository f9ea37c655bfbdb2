"""`quantize_`: attach fake quantizers to the layers a BitConfig names, keeping each module.

Each layer keeps its own class and forward (subclasses, custom padding, tied weights):
- its weight is fake-quantized through a `torch.nn.utils.parametrize` parametrization (a
  `WeightQuantizer`; the float weight stays at `parametrizations.weight.original`);
- its input is fake-quantized by a forward pre-hook calling its `act_quantizer` submodule.

`QuantScheme` says how (grids, scale init, learned or fixed); the bits come from the BitConfig.
The defaults, and why, are in docs/DESIGN.md ("Quantized layers").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .bitconfig import as_bit_config
from .layers import Patterns, find_layers, matches_any
from .quantizers import ACT_MODES, WEIGHT_INITS, WEIGHT_MODES, ActQuantizer, WeightQuantizer
from .trace import call_model, evaluating

__all__ = ["QuantScheme", "quantize_", "quant_layers", "is_quantized", "weight_quantizer",
           "act_quantizer", "attach_quantizers", "swap_quantizers", "layer_class", "added_modules", "float_weight", "int_weight", "act_quantizers", "set_act_quant",
           "freeze_activations", "calibrate_activations", "with_options"]


@dataclass(frozen=True)
class QuantScheme:
    """How a layer is quantized (the bits come from the BitConfig).

    `weight_init`: "mse" (Lp clipping search), "percentile" or "minmax" scale; `weight_mode`:
    "nearest" or "lsq" ("adaround" is set up by `ptq`); `act_mode`: "fixed" or "lsq";
    `*_symmetric`: signed symmetric grid instead of an asymmetric one with a zero point;
    `quantize_input`: quantize the network input (the first layer's input) at
    `first_act_bits` bits, else keep it in floating point.
    """

    weight_init: str = "mse"
    weight_symmetric: bool = False
    weight_mode: str = "nearest"
    act_symmetric: bool = False
    act_mode: str = "fixed"
    quantize_input: bool = True
    first_act_bits: int = 8

    def __post_init__(self) -> None:
        for field, value, valid in (("weight_init", self.weight_init, WEIGHT_INITS),
                                    ("weight_mode", self.weight_mode, WEIGHT_MODES),
                                    ("act_mode", self.act_mode, ACT_MODES)):
            if value not in valid:
                raise ValueError(f"QuantScheme.{field} = {value!r}; valid: {', '.join(valid)}")


def with_options(config: Any, options: Mapping[str, Any]) -> Any:
    """`config` (a PTQConfig/QATConfig dataclass) with fields replaced by `options`; when it
    has a `scheme`, options naming a `QuantScheme` field go there. Unknown names raise."""
    own = {f.name for f in dataclasses.fields(config)}
    nested = {f.name for f in dataclasses.fields(QuantScheme)} if "scheme" in own else set()
    unknown = sorted(set(options) - own - nested)
    if unknown:
        raise TypeError(f"unknown {type(config).__name__} option(s) {unknown}; valid: "
                        f"{sorted((own | nested) - {'scheme'})}")
    mine = {k: v for k, v in options.items() if k in own}
    theirs = {k: v for k, v in options.items() if k not in own}
    if theirs:
        mine["scheme"] = dataclasses.replace(mine.get("scheme", config.scheme), **theirs)
    return dataclasses.replace(config, **mine) if mine else config


# ----------------------------------------------------------------------------- layer access
def weight_quantizer(module: nn.Module) -> Optional[WeightQuantizer]:
    """The `WeightQuantizer` parametrizing `module.weight`, or None."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    return next((p for p in plist if isinstance(p, WeightQuantizer)), None)


def is_quantized(module: nn.Module) -> bool:
    """Whether `quantize_` attached a weight quantizer to `module`."""
    return weight_quantizer(module) is not None


def act_quantizer(module: nn.Module) -> Optional[ActQuantizer]:
    """The input quantizer of a quantized layer, or None (floating-point input)."""
    aq = getattr(module, "act_quantizer", None)
    return aq if isinstance(aq, ActQuantizer) else None


def float_weight(module: nn.Module) -> nn.Parameter:
    """The float weight of a quantized layer (what its quantizer reads; PTQ writes into it)."""
    if not is_quantized(module):
        raise ValueError(f"{type(module).__name__} is not quantized (no weight quantizer)")
    return module.parametrizations.weight.original


def int_weight(module: nn.Module) -> Tensor:
    """Integer weight codes (int32) of a quantized layer on its quantizer's grid."""
    return weight_quantizer(module).int_weight(float_weight(module))


def layer_class(module: nn.Module) -> type:
    """The class of `module` as the user defined it (parametrize wraps it in a subclass)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def added_modules(model: nn.Module) -> set[str]:
    """Names of the submodules `quantize_` added (parametrization containers, quantizers)."""
    out = set()
    for n, m in quant_layers(model):
        out |= {f"{n}.{c}" for c, _ in m.named_modules() if c.startswith("parametrizations")}
        if act_quantizer(m) is not None:
            out.add(f"{n}.act_quantizer")
    return out


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the quantized layers of `model`, in registration order."""
    return [(n, m) for n, m in model.named_modules() if n and is_quantized(m)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every activation quantizer of `model`."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


# ----------------------------------------------------------------------------- quantize_
def quant_input_hook(module: nn.Module, args: tuple) -> Optional[tuple]:
    """Forward pre-hook of a quantized layer: its `act_quantizer` (an ActQuantizer, or what
    `swap_quantizers` put there) applied to the first positional input."""
    aq = getattr(module, "act_quantizer", None)
    if aq is None or not args:
        return None
    return (aq(args[0]),) + tuple(args[1:])


def swap_quantizers(module: nn.Module, weight: Optional[nn.Module] = None,
                    act: Optional[nn.Module] = None) -> None:
    """Replace a quantized layer's weight quantizer and/or input quantizer by other modules
    (`weight(w_float) -> w`, `act(x) -> x`), e.g. export twins emitting ONNX Q/DQ nodes."""
    if not is_quantized(module):
        raise ValueError(f"{type(module).__name__} is not quantized (no weight quantizer)")
    if weight is not None:
        plist = module.parametrizations.weight
        plist[[i for i, p in enumerate(plist) if isinstance(p, WeightQuantizer)][0]] = weight
    if act is not None:
        module.act_quantizer = act


def attach_quantizers(layer: nn.Module, name: str, bits: int, abits: Optional[int],
                      scheme: QuantScheme) -> None:
    """Quantize one layer in place: `bits`-bit weights, `abits`-bit input (None: float input).

    The weight scale is initialised from the current weight (`scheme.weight_init`); `name` only
    labels errors. `quantize_` calls this for every layer of a BitConfig.
    """
    if parametrize.is_parametrized(layer, "weight"):
        raise ValueError(f"layer {name!r}: its weight already has a parametrization "
                         f"({type(layer).__name__}); remove it before quantizing")
    w = layer.weight
    wq = WeightQuantizer(bits, w.size(0), axis=0, symmetric=scheme.weight_symmetric)
    wq = wq.to(w.device)
    wq.init_scale(w, scheme.weight_init)
    wq.set_mode("nearest" if scheme.weight_mode == "adaround" else scheme.weight_mode)
    parametrize.register_parametrization(layer, "weight", wq, unsafe=True)
    if abits is not None:
        layer.act_quantizer = ActQuantizer(abits, symmetric=scheme.act_symmetric,
                                           mode=scheme.act_mode).to(w.device)
        layer.register_forward_pre_hook(quant_input_hook)


def _input_bits(index: int, name: str, scheme: QuantScheme, act_bits: Any,
                config_bits: Mapping[str, int]) -> Optional[int]:
    if index == 0:
        return scheme.first_act_bits if scheme.quantize_input else None
    if isinstance(act_bits, Mapping):
        return int(act_bits.get(name, config_bits.get(name, 8)))
    if act_bits is not None:
        return int(act_bits)
    return int(config_bits.get(name, 8))


def _check_cover(model: nn.Module, names: list[str], skip: Patterns) -> dict[str, nn.Module]:
    layers = dict(find_layers(model))
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"bit_config names {len(missing)} layer(s) the model does not have: "
                         f"{missing}; quantizable layers of the model: {sorted(layers)}")
    already = [n for n in names if is_quantized(layers[n])]
    if already:
        raise ValueError(f"layers already quantized: {already}")
    uncovered = [n for n, m in layers.items() if n not in names and not is_quantized(m)
                 and not matches_any(n, skip)]
    if uncovered:
        raise ValueError(f"the model has {len(uncovered)} quantizable layer(s) missing from the "
                         f"bit_config: {uncovered}; allocate bits for them or exclude them with "
                         f"skip=[...]")
    return layers


def quantize_(model: nn.Module, bit_config: Any, scheme: Optional[QuantScheme] = None, *,
              act_bits: Union[int, Mapping[str, int], None] = None, skip: Patterns = None,
              **options: Any) -> nn.Module:
    """Attach fake quantizers, in place, to every layer named in `bit_config`; returns `model`.

    Args:
        bit_config: anything `ompq.bitconfig.as_bit_config` accepts (BitConfig, dict
            layer -> weight bits, ...); its first layer (execution order) is the network input's.
        scheme: a `QuantScheme`; `**options` override its fields (e.g. `weight_symmetric=True`).
        act_bits: input bits of every layer (int) or per layer (dict); default: the BitConfig's.
        skip: glob patterns of quantizable layers left in floating point.

    Activation quantizers start *observing*: run `calibrate_activations` before use.
    Raises ValueError naming the layers when the BitConfig and the model's layers disagree.
    """
    scheme = with_options(scheme if scheme is not None else QuantScheme(), options)
    cfg = as_bit_config(bit_config)
    names = list(cfg.weight_bits)
    layers = _check_cover(model, names, skip)
    for i, name in enumerate(names):
        if matches_any(name, skip):
            continue
        abits = _input_bits(i, name, scheme, act_bits, cfg.act_bits)
        attach_quantizers(layers[name], name, int(cfg.weight_bits[name]), abits, scheme)
    for aq in act_quantizers(model):
        aq.observing = True
    return model


# ----------------------------------------------------------------------------- activations
def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Enable or disable (pass-through) every activation quantizer."""
    for aq in act_quantizers(model):
        aq.enabled = enabled


def freeze_activations(model: nn.Module) -> None:
    """Turn every observing activation quantizer's EMA range into a fixed scale."""
    for aq in act_quantizers(model):
        if aq.observing:
            aq.freeze()


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Observe activation ranges (EMA) over `batches` (inputs of any form: a tensor, a tuple of
    positional or a dict of keyword tensors), then freeze them."""
    with evaluating(model):
        for aq in act_quantizers(model):
            aq.observing = True
            aq.enabled = True
            aq.initialized.fill_(False)
        for x in batches:
            call_model(model, x)
        freeze_activations(model)
    return model
