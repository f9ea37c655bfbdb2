"""BitConfig: per-layer bits, what they cost and their JSON forms.

`BitConfig` (versioned JSON, sweeps), `CostModel` (size in MiB, BOPs in G per sample),
`as_bit_config` (the one coercion), and interop with HAWQ-V3 and per-layer JSON. The HAWQ key
mapping: docs/DESIGN.md, "Bit configs".

The valid values, one definition for the library and the command line: `check_width` /
`check_bits` (bit-widths: integers in MIN_BITS..MAX_BITS, what the quantizers accept),
`check_budget` (size_mb, bops_g: positive finite numbers) and `check_avg_bits`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ._jsonio import check_payload, read_json, source_path, write_json
from .layers import LayerInfo

FORMAT = "ompq.BitConfig"
VERSION = 1
BITS_PER_MIB = 8 * 2 ** 20
DEFAULT_ACT_BITS = 8
FP32_BITS = 32
HAWQ_IGNORED = ("quant_input", "quant_act_int32", "quant_act_output", "quant_output")
#: Bit-widths of weights and activations: integers in MIN_BITS..MAX_BITS (the quantizers' grid).
MIN_BITS = 2
MAX_BITS = 16
BITS_RANGE = f"{MIN_BITS}..{MAX_BITS}"

PathLike = Union[str, os.PathLike]
#: bits of every layer: one int for all, a mapping name -> bits, or a sequence in layer order.
Bits = Union[int, Mapping[str, int], Sequence[int]]


# ============================================================================ valid values
def _label(what: str) -> str:
    return f"{what}: " if what else ""


def check_width(value: Any, what: str = "") -> int:
    """`value` as one bit-width: an integer (not a bool) in MIN_BITS..MAX_BITS, else ValueError
    naming `what`, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, Integral) or \
            not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{_label(what)}bit-width {value!r} is not an integer in {BITS_RANGE}")
    return int(value)


def check_bits(values: Any, what: str = "") -> tuple[int, ...]:
    """Candidate bit-widths: one width or a non-empty iterable of them (each `check_width`),
    returned sorted and distinct."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = (values,)
    checked = {check_width(v, what) for v in values}
    if not checked:
        raise ValueError(f"{_label(what)}no bit-width given; expected integers in {BITS_RANGE}")
    return tuple(sorted(checked))


def check_budget(value: Any, what: str = "budget") -> float:
    """`value` as a budget (size_mb in MiB, bops_g in GBOPs, avg_bits): a finite number > 0,
    else ValueError naming `what` and the value."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or not value > 0:
        raise ValueError(f"{_label(what)}{value!r} is not a positive finite number")
    return float(value)


def check_avg_bits(value: Any, what: str = "avg_bits") -> float:
    """An average width (bits per weight) as a size budget: `check_budget`, in
    [MIN_BITS, MAX_BITS]."""
    value = check_budget(value, what)
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{_label(what)}{value!r} bits per weight is outside "
                         f"[{MIN_BITS}, {MAX_BITS}] (e.g. 3)")
    return value


@dataclass
class BitConfig:
    """Per-layer weight/activation bits and what they achieve.

    `size_mb`: MiB of quantized weights; `bops_g`: GBOPs per sample; `importance`: the per-layer
    weights θ the objective used (`ompq.objectives`);
    `budget`: {"size_mb": MiB or None, "bops_g": GBOPs or None}; `search_seconds`: solver time.
    """

    weight_bits: dict[str, int]
    act_bits: dict[str, int]
    importance: dict[str, float]
    size_mb: float
    bops_g: float
    status: str
    objective: float
    method: str
    proxy: str
    budget: dict[str, Optional[float]] = field(default_factory=dict)
    search_seconds: float = 0.0
    version: int = VERSION

    @property
    def names(self) -> list[str]:
        """Layer names in execution order."""
        return list(self.weight_bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with "format" and "version"."""
        return {"format": FORMAT, "version": self.version, "method": self.method,
                "proxy": self.proxy, "status": self.status, "objective": self.objective,
                "size_mb": self.size_mb, "bops_g": self.bops_g, "budget": dict(self.budget),
                "search_seconds": self.search_seconds, "weight_bits": dict(self.weight_bits),
                "act_bits": dict(self.act_bits), "importance": dict(self.importance)}

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """JSON text; also written to `path` when given (atomically: the old file or the new
        one, never a partial one)."""
        return write_json(json.dumps(self.to_dict(), indent=1), path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitConfig":
        """Build from a dict checked by `from_json` (KeyError for a missing field)."""
        return cls(weight_bits={k: int(v) for k, v in d["weight_bits"].items()},
                   act_bits={k: int(v) for k, v in d["act_bits"].items()},
                   importance={k: float(v) for k, v in d.get("importance", {}).items()},
                   size_mb=float(d["size_mb"]), bops_g=float(d["bops_g"]),
                   status=str(d["status"]), objective=float(d["objective"]),
                   method=str(d["method"]), proxy=str(d["proxy"]),
                   budget={k: (None if v is None else float(v))
                           for k, v in d.get("budget", {}).items()},
                   search_seconds=float(d.get("search_seconds", 0.0)), version=VERSION)

    @classmethod
    def from_json(cls, src: Union[PathLike, Mapping[str, Any]]) -> "BitConfig":
        """Load from JSON text, a file path or a dict; refuses other formats, newer versions
        and a sweep (a list: `load_bit_configs`)."""
        path = source_path(src)
        data = read_json(src, f"{FORMAT} JSON")
        if isinstance(data, list):
            raise ValueError(f"{_where(path)}this JSON holds a list of BitConfigs (a Pareto "
                             "sweep); load it with ompq.bitconfig.load_bit_configs")
        return _from_payload(data, path)


def _where(path: Optional[str]) -> str:
    return f"{path!r}: " if path else ""


def _from_payload(data: Any, path: Optional[str]) -> BitConfig:
    """A BitConfig from a parsed JSON object after the format/version check."""
    try:
        return BitConfig.from_dict(check_payload(data, FORMAT, VERSION, path))
    except KeyError as err:
        raise ValueError(f"{_where(path)}BitConfig JSON lacks the field {err.args[0]!r}") \
            from None


def save_bit_configs(configs: Sequence[BitConfig], path: Optional[PathLike] = None) -> str:
    """JSON text of a list of BitConfigs (a Pareto sweep); also written to `path` when given
    (atomically, see `ompq.checkpoint`)."""
    return write_json(json.dumps([c.to_dict() for c in configs], indent=1), path)


def load_bit_configs(src: Union[PathLike, list, Mapping[str, Any]]) -> list[BitConfig]:
    """One BitConfig or a list of them (JSON text, a file path or parsed JSON) as a list."""
    path = source_path(src)
    data = read_json(src, f"{FORMAT} JSON")
    items = data if isinstance(data, list) else [data]
    return [_from_payload(x, path) for x in items]


# ============================================================================ cost model
def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


@dataclass
class CostModel:
    """Weight size and BOPs of per-layer bit-widths, from the layers' weight elements (`params`)
    and per-sample multiply-accumulates (`macs`), in layer order.

    Exact integers: `size_bits` = Σ params·b_w (bits), `bops` = Σ MACs·b_w·b_a (per sample).
    Reported units: `size_mb` = size_bits / (8·2**20) MiB, `bops_g` = bops / 1e9 GBOPs. Biases
    and BatchNorm parameters are not counted.
    """

    names: tuple[str, ...]
    params: tuple[int, ...]
    macs: tuple[int, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        self.params = tuple(int(p) for p in self.params)
        self.macs = tuple(int(m) for m in self.macs)
        if not len(self.names) == len(self.params) == len(self.macs):
            raise ValueError(f"CostModel: {len(self.names)} names, {len(self.params)} params "
                             f"and {len(self.macs)} MACs; give one of each per layer")
        self._index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_layers(cls, layers: Sequence[LayerInfo]) -> "CostModel":
        """The cost model of measured layers (`LayerInfo`, e.g. `Profile.layers`)."""
        return cls(tuple(layer.name for layer in layers), tuple(layer.params for layer in layers),
                   tuple(layer.macs for layer in layers))

    @property
    def total_params(self) -> int:
        """Weight elements of all layers."""
        return sum(self.params)

    def size_bits(self, weight_bits: Bits) -> int:
        """Σ params_i · b_w,i: bits of the quantized weights (the layers `weight_bits` names)."""
        return sum(self.params[i] * b for i, b in self._items(weight_bits))

    def bops(self, weight_bits: Bits, act_bits: Bits = DEFAULT_ACT_BITS) -> int:
        """Σ MACs_i · b_w,i · b_a,i: bit operations per input sample (act bits default 8)."""
        act = self._act(act_bits)
        return sum(self.macs[i] * b * act[i] for i, b in self._items(weight_bits))

    def size_mb(self, weight_bits: Bits) -> float:
        """Size of the quantized weights in MiB: `size_bits` / (8 · 2**20)."""
        return self.size_bits(weight_bits) / BITS_PER_MIB

    def bops_g(self, weight_bits: Bits, act_bits: Bits = DEFAULT_ACT_BITS) -> float:
        """GBOPs per input sample: `bops` / 1e9."""
        return self.bops(weight_bits, act_bits) / 1e9

    def fp32_size_mb(self) -> float:
        """MiB of the float model's weights (32 bits each)."""
        return self.size_mb(FP32_BITS)

    def fp32_bops_g(self) -> float:
        """GBOPs per sample of the float model (32-bit weights and activations)."""
        return self.bops_g(FP32_BITS, FP32_BITS)

    def size_mb_at(self, avg_bits: float) -> float:
        """The size budget (MiB) of `avg_bits` bits per weight on average."""
        return avg_bits * self.total_params / BITS_PER_MIB

    def complete(self, cfg: BitConfig) -> BitConfig:
        """A copy of `cfg` (e.g. imported, with size and BOPs 0) with its size_mb and bops_g."""
        return dataclasses.replace(cfg, size_mb=self.size_mb(cfg.weight_bits),
                                   bops_g=self.bops_g(cfg.weight_bits, cfg.act_bits))

    def _items(self, bits: Bits) -> list[tuple[int, int]]:
        """(layer index, bits) pairs of one int for every layer, a mapping name -> bits (only
        the layers it names) or a sequence in layer order."""
        if _is_int(bits):
            return [(i, int(bits)) for i in range(len(self.names))]
        if isinstance(bits, Mapping):
            unknown = [n for n in bits if n not in self._index]
            if unknown:
                raise ValueError(f"no parameter/MAC counts for layer(s) {unknown[:8]}; layers: "
                                 f"{list(self.names)}")
            return [(self._index[n], int(b)) for n, b in bits.items()]
        return list(enumerate(self._sequence(bits, "weight bits")))

    def _act(self, act_bits: Bits) -> list[int]:
        """Activation bits in layer order (a mapping: 8 for the layers it does not name)."""
        if _is_int(act_bits):
            return [int(act_bits)] * len(self.names)
        if isinstance(act_bits, Mapping):
            return [int(act_bits.get(n, DEFAULT_ACT_BITS)) for n in self.names]
        return self._sequence(act_bits, "activation bits")

    def _sequence(self, bits: Sequence[int], what: str) -> list[int]:
        out = [int(b) for b in bits]
        if len(out) != len(self.names):
            raise ValueError(f"{what}: {len(out)} values for {len(self.names)} layers")
        return out


# ============================================================================ coercion
def check_layer_names(weight_bits: Mapping[str, int], act_bits: Mapping[str, int],
                      layer_names: Sequence[str], what: str = "bit config") -> None:
    """ValueError unless `weight_bits` covers exactly `layer_names` and `act_bits` names no
    other layer; the message lists the unknown and missing names and the valid ones."""
    known = set(layer_names)
    extra = sorted((set(weight_bits) | set(act_bits)) - known)
    missing = [n for n in layer_names if n not in weight_bits]
    if extra or missing:
        raise ValueError(f"{what} does not match the model's layers: unknown {extra}, "
                         f"missing weight bits for {missing}; valid layer names: "
                         f"{list(layer_names)}")


def as_bit_config(bit_config: Any, layer_names: Optional[Sequence[str]] = None) -> BitConfig:
    """`bit_config` as a BitConfig: a BitConfig (returned as is), its JSON dict, a dict
    layer -> bits (activations 8 bits), a per-layer ``{layer: {"w_bits", "a_bits"}}`` dict, a
    HAWQ-style dict, or JSON text / a file path holding one of them (`read_bit_config`).
    With `layer_names`, the layers must match them (`check_layer_names`). Imported forms get
    proxy "custom", status "IMPORTED" and size/BOPs 0 (`CostModel.complete` fills them)."""
    if isinstance(bit_config, BitConfig):
        if layer_names is not None:
            check_layer_names(bit_config.weight_bits, bit_config.act_bits, layer_names)
        return bit_config
    if isinstance(bit_config, Mapping):
        return _from_dict(bit_config, layer_names)
    if isinstance(bit_config, (str, os.PathLike)):
        return read_bit_config(bit_config, layer_names)
    raise TypeError(f"bit_config must be a BitConfig, a dict (BitConfig JSON, layer -> bits, "
                    f"per-layer or HAWQ-style) or a path to such a JSON file; got "
                    f"{type(bit_config).__name__}")


def read_bit_config(src: PathLike, layer_names: Optional[Sequence[str]] = None) -> BitConfig:
    """A BitConfig from a JSON file (or JSON text) holding a BitConfig, a per-layer
    ``{"layer": {"w_bits", "a_bits"}}`` dict or a HAWQ-style ``{"layer": bits, "layer_act":
    bits}`` dict; errors name the file. `layer_names`: as in `as_bit_config`."""
    path = source_path(src)
    data = read_json(src, "bit config JSON")
    with _naming(path):
        if not isinstance(data, Mapping):
            raise ValueError("a bit config must be a JSON object, got a list (a Pareto sweep "
                             "is read with ompq.bitconfig.load_bit_configs)")
        return _from_dict(data, layer_names)


@contextmanager
def _naming(path: Optional[str]) -> Iterator[None]:
    """Prefix ValueErrors raised inside with the file path (when there is one)."""
    try:
        yield
    except ValueError as err:
        if not path:
            raise
        raise ValueError(f"{path!r}: {err}") from None


def _from_dict(d: Mapping[str, Any], layer_names: Optional[Sequence[str]]) -> BitConfig:
    if not d:
        raise ValueError("a bit config must be a non-empty JSON object: a BitConfig, "
                         "{layer: bits} or {layer: {'w_bits': b, 'a_bits': a}}")
    if "format" in d:
        cfg = _from_payload(d, None)
        if layer_names is not None:
            check_layer_names(cfg.weight_bits, cfg.act_bits, layer_names, "BitConfig")
        return cfg
    if all(isinstance(v, Mapping) for v in d.values()):
        return from_layer_json(d, layer_names=layer_names)
    return from_hawq_bit_config(d, layer_names=layer_names)


def _imported(weight_bits: dict[str, int], act_bits: dict[str, int]) -> BitConfig:
    return BitConfig(weight_bits=weight_bits, act_bits=act_bits, importance={}, size_mb=0.0,
                     bops_g=0.0, status="IMPORTED", objective=0.0, method="import",
                     proxy="custom", budget={"size_mb": None, "bops_g": None},
                     search_seconds=0.0)


# ============================================================================ interop
def to_hawq_bit_config(bit_config: Any, *, input_key: bool = True) -> dict[str, int]:
    """HAWQ-V3-style ``bit_config`` dict of a BitConfig (any form of `as_bit_config`; mapping in
    the module docstring): ``{"quant_input": a0, "<layer>": w_bits, "<layer>_act": a_bits,
    ...}`` in layer order."""
    cfg = as_bit_config(bit_config)
    wb, ab = cfg.weight_bits, cfg.act_bits
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
                         name_map: Optional[Mapping[str, str]] = None,
                         default_act_bits: int = DEFAULT_ACT_BITS,
                         ignore: Sequence[str] = HAWQ_IGNORED) -> BitConfig:
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
        A BitConfig (proxy "custom", size/BOPs left 0: `CostModel.complete` fills them).
    """
    name_map = dict(name_map or {})
    wb: dict[str, int] = {}
    ab: dict[str, int] = {}
    for key, bits in d.items():
        if key in ignore and key not in name_map:
            continue
        bits = check_width(bits, f"HAWQ bit_config[{key!r}]")
        if _is_act_key(key):
            layer = name_map.get(key, key[:-4] if key.endswith("_act") else key)
            ab[layer] = bits
        else:
            wb[name_map.get(key, key)] = bits
    if layer_names is not None:
        check_layer_names(wb, ab, layer_names, "HAWQ-style {layer: bits} dict")
        wb = {n: wb[n] for n in layer_names}
    if "quant_input" in d and wb:
        ab.setdefault(next(iter(wb)), check_width(d["quant_input"],
                                                  "HAWQ bit_config['quant_input']"))
    ab = {n: ab.get(n, default_act_bits) for n in wb}
    return _imported(wb, ab)


def to_layer_json(bit_config: Any) -> dict[str, dict[str, int]]:
    """Plain per-layer dict ``{"layer": {"w_bits": 4, "a_bits": 8}, ...}`` (layer order) of a
    BitConfig (any form of `as_bit_config`)."""
    cfg = as_bit_config(bit_config)
    return {n: {"w_bits": b, "a_bits": cfg.act_bits.get(n, DEFAULT_ACT_BITS)}
            for n, b in cfg.weight_bits.items()}


def from_layer_json(d: Mapping[str, Mapping[str, int]], *,
                    layer_names: Optional[Sequence[str]] = None,
                    default_act_bits: int = DEFAULT_ACT_BITS) -> BitConfig:
    """BitConfig from the plain per-layer dict (``a_bits`` optional, default 8)."""
    wb, ab = {}, {}
    for name, entry in d.items():
        if not isinstance(entry, Mapping) or "w_bits" not in entry:
            raise ValueError(f"layer {name!r}: expected {{'w_bits': int, 'a_bits': int}}, "
                             f"got {entry!r}")
        wb[name] = check_width(entry["w_bits"], f"layer {name!r} w_bits")
        ab[name] = check_width(entry.get("a_bits", default_act_bits), f"layer {name!r} a_bits")
    if layer_names is not None:
        check_layer_names(wb, ab, layer_names, "per-layer JSON")
        wb = {n: wb[n] for n in layer_names}
        ab = {n: ab[n] for n in layer_names}
    return _imported(wb, ab)


def write_layer_json(bit_config: Any, path: PathLike) -> Path:
    """Write `to_layer_json(bit_config)` to `path` atomically (parent folders are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json(json.dumps(to_layer_json(bit_config), indent=1), p)
    return p


def read_layer_json(path: PathLike, **kwargs: Any) -> BitConfig:
    """Read a plain per-layer JSON file into a BitConfig (kwargs as `from_layer_json`); errors
    name the file."""
    data = read_json(path, "per-layer bits JSON")
    with _naming(source_path(path)):
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object {{layer: {{'w_bits', 'a_bits'}}}}, got "
                             f"{type(data).__name__}")
        return from_layer_json(data, **kwargs)
