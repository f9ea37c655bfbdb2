"""Streaming profiler: one inference forward, one centred Gram per layer, one matrix product.

`profile(model, data)` returns a `Profile` (versioned JSON): layer stats, the L×L ORM and the
distortion table. Which tensor is a layer's feature, and the O(L·N²) memory bound:
docs/DESIGN.md, "Profiler".
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._jsonio import load_json_payload, write_json
from .bitconfig import check_bits
from .data import sample_inputs
from .distortion import (DEFAULT_SAMPLES, DISTORTION_BITS, DistortionTable, LayerMeter,
                         fold_scales, table_from_meters)
from .layers import LayerInfo, Patterns, find_layers, layer_info
from .trace import Hooks, call_model, first_tensor
from .orm import MIN_SAMPLES, feature_gram, flatten_samples, orm_from_grams, orm_gamma
from .stages import stage

FORMAT = "ompq.Profile"
VERSION = 2  # 2: adds the per-layer, per-width distortion table

FOLLOW_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.Identity,
)
FEATURES = ("auto", "output")
MEMORY_FORMATS = ("auto", "channels_last", "preserve")


@dataclass
class Profile:
    """Result of `profile()`: layers in execution order, their L×L ORM (float64) and timings.

    `timings` (seconds): "forward" (the forward pass without the Gram and distortion work),
    "gram" (inside the hooks), "distortion" (the distortion table, inside the hooks), "orm" (the
    L×L product), "total" (the whole `profile()` call). `distortion`: the per-layer, per-width
    table the default allocation objective needs (None for a version-1 profile or
    `distortion_bits=None`).
    """

    layers: list[LayerInfo]
    orm: Tensor
    num_samples: int
    seed: int
    feature: str
    debiased: bool
    timings: dict[str, float] = field(default_factory=dict)
    model: Optional[str] = None
    distortion: Optional[DistortionTable] = None
    version: int = VERSION

    @property
    def names(self) -> list[str]:
        """Layer names in execution order."""
        return [layer.name for layer in self.layers]

    def gamma(self) -> Tensor:
        """γ_i = mean over j ≠ i of ORM(i, j) (`ompq.orm.orm_gamma`; float64, length L)."""
        return orm_gamma(self.orm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with "format" and "version"."""
        return {"format": FORMAT, "version": self.version, "model": self.model,
                "num_samples": self.num_samples, "seed": self.seed, "feature": self.feature,
                "debiased": self.debiased, "timings": dict(self.timings),
                "layers": [layer.to_dict() for layer in self.layers],
                "orm": self.orm.to(torch.float64).cpu().tolist(),
                "distortion": None if self.distortion is None else self.distortion.to_dict()}

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """JSON text (floats round-trip exactly); also written to `path` when given
        (atomically: the old file or the new one, never a partial one)."""
        return write_json(json.dumps(self.to_dict(), indent=1), path)

    @classmethod
    def from_json(cls, src: Union[str, os.PathLike, dict]) -> "Profile":
        """Load from JSON text, a file path or a dict; refuses other formats/newer versions.

        A version-1 profile loads without a distortion table: the paper's objective
        (proxy="orm-linear") and the baselines work on it, the default objective asks to
        re-profile."""
        d = load_json_payload(src, FORMAT, VERSION)
        layers = [LayerInfo.from_dict(x) for x in d["layers"]]
        orm = torch.tensor(d["orm"], dtype=torch.float64)
        if orm.shape != (len(layers), len(layers)):
            raise ValueError(f"Profile JSON: orm has shape {tuple(orm.shape)} for "
                             f"{len(layers)} layers")
        return cls(layers=layers, orm=orm, num_samples=int(d["num_samples"]),
                   seed=int(d["seed"]), feature=str(d["feature"]), debiased=bool(d["debiased"]),
                   timings={k: float(v) for k, v in d.get("timings", {}).items()},
                   model=d.get("model"), version=VERSION,
                   distortion=None if d.get("distortion") is None
                   else DistortionTable.from_dict(d["distortion"]))


# ----------------------------------------------------------------------------- sampling
def _profile_inputs(inputs: Any, num_samples: int, seed: int) -> Tensor:
    """The `num_samples` (≥ `MIN_SAMPLES`) profiled inputs: `ompq.data.sample_inputs` keeping
    the data order (sorted draw); too few samples raise ValueError."""
    if isinstance(num_samples, int) and not isinstance(num_samples, bool) \
            and num_samples < MIN_SAMPLES:
        raise ValueError(f"num_samples must be at least {MIN_SAMPLES} (centred Grams and the "
                         f"debiased HSIC need N ≥ 4), got {num_samples}")
    return sample_inputs(inputs, num_samples, seed, keep_order=True, strict=True)


# ----------------------------------------------------------------------------- recording
_ENERGY_PROBE = 1024


def _energy_estimate(x: Tensor) -> float:
    """Estimate of the raw energy Σ_n ‖x_n‖² from ~1024 evenly strided elements of sample 0.

    Only used to tell constant features (whose centred Gram is rounding noise) apart; a probe
    this small runs single-threaded and costs microseconds.
    """
    flat = flatten_samples(x[:1])[0]  # a view for contiguous and channels_last features
    step = max(1, flat.numel() // _ENERGY_PROBE)
    probe = flat[::step].double()
    return float(probe.square().mean()) * flat.numel() * x.shape[0]


class _Recorder:
    """Hook bookkeeping: pending feature chain, Grams, layer stats, timings."""

    def __init__(self, names: Sequence[str], num_samples: int, feature: str, pbar: Any,
                 meters: Optional[dict[str, LayerMeter]] = None) -> None:
        self.names = set(names)
        self.meters = meters or {}
        self.distortion_seconds = 0.0
        self.num_samples = num_samples
        self.feature = feature
        self.pbar = pbar
        self.grams: dict[str, Tensor] = {}
        self.energy: dict[str, float] = {}
        self.infos: dict[str, LayerInfo] = {}
        self.pending_name: Optional[str] = None
        self.pending: Optional[Tensor] = None
        self.live_pending = 0
        self.max_pending = 0
        self.gram_seconds = 0.0
        self.gram_calls = 0

    # -- Gram of one feature
    def _add_gram(self, name: str, x: Tensor) -> None:
        if x.shape[0] != self.num_samples:
            raise ValueError(f"layer {name!r} returned a tensor of shape {tuple(x.shape)}; ompq "
                             f"needs the batch of {self.num_samples} samples on dim 0")
        cuda = x.is_cuda
        if cuda:  # time the Gram work alone
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        try:
            gram = feature_gram(x)
        except ValueError as err:  # the compiled op refuses NaN/Inf: name the layer
            raise ValueError(f"layer {name!r} has a non-finite feature: {err}") from err
        if gram.dtype != torch.float32:
            gram = gram.float()
        energy = _energy_estimate(x)  # float(): waits for the GPU too
        self.gram_seconds += time.perf_counter() - t0
        self.gram_calls += 1
        if name in self.grams:
            self.grams[name] += gram
            self.energy[name] += energy
        else:
            self.grams[name] = gram
            self.energy[name] = energy
            if self.pbar is not None:
                self.pbar.update(1)

    def _set_pending(self, name: str, x: Tensor) -> None:
        self.pending_name, self.pending = name, x
        self.live_pending = 1
        self.max_pending = max(self.max_pending, self.live_pending)

    def flush(self) -> None:
        """End the pending chain: reduce its tensor to a Gram and drop the reference."""
        if self.pending is not None:
            name, x = self.pending_name, self.pending
            self.pending_name, self.pending = None, None
            self.live_pending = 0
            self._add_gram(name, x)

    # -- hooks
    def pre_hook(self, module: nn.Module, args: Any) -> None:
        """Before a leaf module: a BN/activation on the pending tensor continues it, else end."""
        if self.pending is None:
            return
        if isinstance(module, FOLLOW_TYPES) and args and args[0] is self.pending:
            return
        self.flush()

    def follow_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        """After a BN/activation module: its output continues the pending chain."""
        if self.pending is not None and args and args[0] is self.pending \
                and isinstance(out, Tensor):
            self.pending = out

    def layer_hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            inp, o = first_tensor(args), out if isinstance(out, Tensor) else first_tensor(out)
            if inp is None or o is None:
                raise ValueError(f"layer {name!r} has no tensor input/output; exclude it")
            info = layer_info(name, module, inp, o)
            if name in self.infos:
                self.infos[name].macs += info.macs
            else:
                self.infos[name] = info
            if name in self.meters:
                t0 = time.perf_counter()
                self.meters[name].update(module, inp, o)
                self.distortion_seconds += time.perf_counter() - t0
            if self.feature == "output":
                self._add_gram(name, o)
            else:
                self.flush()
                self._set_pending(name, o)
        return hook


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _register(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], rec: _Recorder,
              feature: str) -> Hooks:
    hooks = Hooks()
    layer_ids = {id(m) for _, m in layers}
    if feature == "auto":
        for _, m in model.named_modules():
            if next(m.children(), None) is None or id(m) in layer_ids:
                hooks.pre(m, rec.pre_hook)
                if isinstance(m, FOLLOW_TYPES):
                    hooks.post(m, rec.follow_hook)
    for name, m in layers:
        hooks.post(m, rec.layer_hook(name))
    return hooks


def _make_pbar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="ompq profile", unit="layer", leave=False)


def _run_input(model: nn.Module, x: Tensor, memory_format: str) -> Tensor:
    """The input of the profiling forward: channels_last for 4-D inputs of models with a Conv2d
    ("auto"; oneDNN/cuDNN convolutions run faster on it, ~1.4× for a ResNet-50 on 2 CPU
    threads, and the Grams do not depend on the layout), x itself otherwise."""
    if x.dim() != 4 and memory_format == "channels_last":
        raise ValueError(f"memory_format='channels_last' needs a 4-D (N, C, H, W) input, got "
                         f"shape {tuple(x.shape)}; use 'auto' or 'preserve'")
    if x.dim() != 4 or memory_format == "preserve":
        return x
    if memory_format == "auto" and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _meters(model: nn.Module, layers: list, x: Tensor, bits: Optional[tuple[int, ...]],
            samples: int) -> dict[str, LayerMeter]:
    """One distortion meter per layer (none when `bits` is None), with PTQ's BN folding."""
    if bits is None:
        return {}
    scales = fold_scales(model, x[:2])
    return {n: LayerMeter(bits, samples, scales.get(n)) for n, _ in layers}


def _record(model: nn.Module, layers: list, x: Tensor, num_samples: int, feature: str,
            progress: bool, bits: Optional[tuple[int, ...]] = None, samples: int = 0
            ) -> tuple[_Recorder, float]:
    """One hooked inference forward of x; returns the recorder and the forward's seconds."""
    meters = _meters(model, layers, x, bits, samples)
    pbar = _make_pbar(len(layers), progress)
    rec = _Recorder([n for n, _ in layers], num_samples, feature, pbar, meters)
    try:
        with _register(model, layers, rec, feature):
            t0 = time.perf_counter()
            with torch.inference_mode():
                call_model(model, x)
                rec.flush()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            return rec, time.perf_counter() - t0
    finally:
        if pbar is not None:
            pbar.close()


@stage("profiling")
def profile(model: nn.Module, inputs: Any, *, num_samples: int = 64, seed: int = 0,
            include: Patterns = None, exclude: Patterns = None,
            types: Optional[tuple[type, ...]] = None, feature: str = "auto",
            debiased: bool = False, device: Optional[Union[str, torch.device]] = None,
            progress: bool = True, description: Optional[str] = None,
            memory_format: str = "auto",
            distortion_bits: Optional[Sequence[int]] = DISTORTION_BITS,
            distortion_samples: int = DEFAULT_SAMPLES) -> Profile:
    """Profile `model`: layer stats and the L×L ORM from one streaming inference forward.

    `inputs`: a tensor with ≥ `num_samples` samples on dim 0, a Dataset (items `x` or `(x, y)`)
    or an iterable of batches; `num_samples` (≥ 4) are drawn with `seed`. The model runs once
    in eval mode under `torch.inference_mode()` (its training flag is restored; on `device` when
    given, then moved back). `include`/`exclude`/`types` select layers as in `find_layers`.
    `feature`: "auto" (after a directly following BN/activation, see the module docstring) or
    "output" (raw layer output). `debiased`: unbiased HSIC. `memory_format`: "auto" feeds a 4-D
    input to a model with Conv2d layers in channels_last (faster convolutions; the model is not
    modified, and a forward that fails on it is rerun once on the input as drawn, with a
    warning), "channels_last" always does (no retry), "preserve" never does.
    `distortion_bits`: widths of the distortion table (`ompq.distortion`; None skips it), measured
    on the first `distortion_samples` samples inside the same forward. Returns a
    `Profile` whose layers are in execution order; selected layers that do not run raise
    ValueError.
    """
    t_start = time.perf_counter()
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    bits = None if distortion_bits is None else check_bits(distortion_bits, "distortion_bits")
    if isinstance(distortion_samples, bool) or not isinstance(distortion_samples, int) \
            or distortion_samples < 1:
        raise ValueError(f"distortion_samples must be a positive int, got {distortion_samples!r}")
    dist_samples = min(distortion_samples, num_samples)
    layers = find_layers(model, include=include, exclude=exclude, types=types)
    x = _profile_inputs(inputs, num_samples, seed)
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    was_training = model.training
    if target != home:
        model.to(target)
    try:
        x = x.to(target)
        x_run = _run_input(model, x, memory_format)
        model.eval()
        try:
            rec, t_forward = _record(model, layers, x_run, num_samples, feature, progress,
                                     bits, dist_samples)
        except RuntimeError as err:
            if memory_format != "auto" or x_run is x:
                raise
            warnings.warn(f"ompq.profile: the forward failed on a channels_last input ({err}); "
                          "rerunning it on the input as drawn (memory_format='preserve' skips "
                          "the attempt)", RuntimeWarning, stacklevel=2)
            rec, t_forward = _record(model, layers, x, num_samples, feature, progress, bits,
                                     dist_samples)
    finally:
        model.train(was_training)
        if target != home:
            model.to(home)
    not_run = [n for n, _ in layers if n not in rec.infos]
    if not_run:
        raise ValueError(f"layer(s) {', '.join(repr(n) for n in not_run[:8])} did not run in "
                         "the forward pass; exclude them (exclude=...)")
    order = list(rec.infos)
    t1 = time.perf_counter()
    grams = torch.stack([rec.grams[n] for n in order])
    energy = torch.tensor([rec.energy[n] for n in order], dtype=torch.float64)
    orm = orm_from_grams(grams, debiased=debiased, names=order, scales=energy).cpu()
    t_orm = time.perf_counter() - t1
    table = table_from_meters(rec.meters, order, bits, dist_samples) if bits else None
    timings = {"forward": t_forward - rec.gram_seconds - rec.distortion_seconds,
               "gram": rec.gram_seconds, "distortion": rec.distortion_seconds, "orm": t_orm,
               "total": time.perf_counter() - t_start}
    return Profile(layers=[rec.infos[n] for n in order], orm=orm, num_samples=num_samples,
                   seed=seed, feature=feature, debiased=debiased, timings=timings,
                   model=description if description is not None else type(model).__name__,
                   distortion=table)
