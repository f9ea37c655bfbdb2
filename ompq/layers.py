"""Quantizable layers of any `nn.Module`: discovery by name/type and stats from a real forward.

A *layer* is a module of one of `QUANTIZABLE_TYPES` (every Conv1d/2d/3d, grouped and depthwise
included, and every Linear), named by its module path as in `model.named_modules()` /
`state_dict`. Parameter counts, shapes and MACs are measured from a real forward pass, so size
(MiB) and BOPs need no per-architecture tables.

Units: `params` = weight elements (no bias); `macs` = multiply-accumulates for ONE input sample,
summed over every call of the module in one forward (a module applied twice counts twice).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence, Union

from torch import Tensor, nn

from .trace import Hooks, first_tensor, forward

QUANTIZABLE_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

Patterns = Optional[Union[str, Sequence[str]]]


@dataclass
class LayerInfo:
    """Static and measured facts about one quantizable layer.

    `params`: weight elements (no bias); `macs`: multiply-accumulates per input sample;
    `out_shape`/`in_shape`: per-sample shapes (no batch dim) of the first call.
    """

    name: str
    kind: str
    params: int
    macs: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    groups: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        d = asdict(self)
        d["out_shape"] = list(self.out_shape)
        d["in_shape"] = list(self.in_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerInfo":
        """Inverse of `to_dict`."""
        try:
            return cls(name=str(d["name"]), kind=str(d["kind"]), params=int(d["params"]),
                       macs=int(d["macs"]), out_shape=tuple(int(v) for v in d["out_shape"]),
                       in_shape=tuple(int(v) for v in d["in_shape"]),
                       groups=int(d.get("groups", 1)))
        except KeyError as err:
            raise ValueError(f"layer entry {d!r} lacks the field {err.args[0]!r}") from None


def _as_patterns(patterns: Patterns, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, Iterable):
        out = list(patterns)
        for p in out:
            if not isinstance(p, str):
                raise TypeError(f"{what} patterns must be strings (fnmatch globs), got {p!r}")
        return out
    raise TypeError(f"{what} must be a glob string or a list of them, "
                    f"got {type(patterns).__name__}")


def match_names(pattern: str, names: Sequence[str]) -> list[str]:
    """Names matching a glob pattern (fnmatch, case-sensitive); an exact name always matches."""
    return [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]


def match_pattern(pattern: Any, names: Sequence[str], what: str = "pattern") -> list[str]:
    """The names a glob `pattern` matches (`match_names`); TypeError unless it is a string,
    ValueError naming the pattern and listing `names` when it matches none."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} patterns must be layer names or glob strings, got {pattern!r}")
    hit = match_names(pattern, names)
    if not hit:
        raise ValueError(f"{what} pattern {pattern!r} matches no layer; layers: "
                         f"{_preview(names)}")
    return hit


def matches_any(name: str, patterns: Patterns) -> bool:
    """Whether `name` matches one of the glob `patterns` (None matches nothing)."""
    return any(match_names(p, [name]) for p in _as_patterns(patterns, "pattern"))


def _preview(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def find_layers(model: nn.Module, include: Patterns = None, exclude: Patterns = None,
                types: Optional[tuple[type, ...]] = None) -> list[tuple[str, nn.Module]]:
    """Quantizable layers of `model` as (name, module), in registration order.

    `include`/`exclude`: a glob (fnmatch) or a list of globs on the layer name; a pattern that
    matches no layer raises ValueError listing the available names. `types`: module types to
    consider (default `QUANTIZABLE_TYPES`). Raises ValueError when no layer remains.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    types = QUANTIZABLE_TYPES if types is None else tuple(types)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"types must be nn.Module subclasses, got {t!r}")
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    names = [n for n, _ in layers]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer of the types "
                         f"{[t.__name__ for t in types]}")
    inc = _as_patterns(include, "include")
    keep = {n for p in inc for n in match_pattern(p, names, "include")} if inc else set(names)
    for p in _as_patterns(exclude, "exclude"):
        keep.difference_update(match_pattern(p, names, "exclude"))
    out = [(n, m) for n, m in layers if n in keep]
    if not out:
        raise ValueError("include/exclude patterns leave no layer; layers: " + _preview(names))
    return out


def weight_params(module: nn.Module) -> int:
    """Number of weight elements of a layer (its `.weight`; 0 when it has none)."""
    w = getattr(module, "weight", None)
    return int(w.numel()) if isinstance(w, Tensor) else 0


def _is_batched(module: nn.Module, x: Tensor) -> bool:
    """False for unbatched inputs: conv (C, *spatial) or a 1-D linear input."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return x.dim() == len(module.kernel_size) + 2
    return x.dim() >= 2


def call_stats(module: nn.Module, inp: Tensor, out: Tensor) -> tuple[int, tuple[int, ...],
                                                                      tuple[int, ...], int]:
    """(MACs per sample, per-sample in_shape, per-sample out_shape, batch) of one layer call.

    conv: `out.numel()/batch · (C_in/groups) · prod(kernel)`; linear: `out.numel()/batch ·
    in_features`; other types: 0 MACs.
    """
    batched = _is_batched(module, inp)
    batch = int(inp.shape[0]) if batched else 1
    per_out = out.numel() // max(batch, 1)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        macs = per_out * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    elif isinstance(module, nn.Linear):
        macs = per_out * module.in_features
    else:
        macs = 0
    drop = 1 if batched else 0
    in_shape = tuple(int(s) for s in inp.shape[drop:])
    out_shape = tuple(int(s) for s in out.shape[drop:])
    return int(macs), in_shape, out_shape, batch


def layer_info(name: str, module: nn.Module, inp: Tensor, out: Tensor) -> LayerInfo:
    """LayerInfo from one observed call of `module`."""
    macs, in_shape, out_shape, _ = call_stats(module, inp, out)
    return LayerInfo(name=name, kind=type(module).__name__, params=weight_params(module),
                     macs=macs, out_shape=out_shape, in_shape=in_shape,
                     groups=int(getattr(module, "groups", 1)))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def measure_layers(model: nn.Module, example_input: Any,
                   names: Optional[Sequence[str]] = None) -> list[LayerInfo]:
    """Measure params, MACs and shapes of layers from one forward of `example_input`.

    `names`: layer names to measure (default: every layer `find_layers` finds). The model runs in
    eval mode under `torch.inference_mode()` (its training flag is restored). Returns LayerInfo in
    order of first execution; a named layer that does not run raises ValueError.
    """
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, _ in find_layers(model)]
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__}")
    infos: dict[str, LayerInfo] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            inp, o = first_tensor(args), first_tensor(out)
            if inp is None or o is None:
                return
            info = layer_info(name, module, inp, o)
            if name in infos:
                infos[name].macs += info.macs
            else:
                infos[name] = info
        return hook

    hooks = Hooks()
    for n in names:
        hooks.post(modules[n], make_hook(n))
    forward(model, example_input, hooks, grad_mode="inference")
    not_run = [n for n in names if n not in infos]
    if not_run:
        raise ValueError(f"layer(s) {_preview([repr(n) for n in not_run])} did not run in the "
                         "forward pass; exclude them (exclude=...)")
    return list(infos.values())
