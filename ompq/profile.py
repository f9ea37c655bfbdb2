"""Streaming profiler: inference forwards over micro-batches, one centred Gram per layer and
batch, one L×L sum of HSIC estimates.

`profile(model, data)` returns a `Profile` (versioned JSON): layer stats, the L×L ORM and the
distortion table. Which tensor is a layer's feature, token masks, micro-batches, processes and
the O(L·m² + L²) memory bound: docs/DESIGN.md, "Profiler".
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
from . import ops
from .data import Sample, draw_sample
from .distributed import all_reduce, rank_world
from .inputs import num_rows, to_device
from .distortion import (DEFAULT_SAMPLES, DISTORTION_BITS, DistortionTable, LayerMeter,
                         fold_scales, table_from_meters)
from .layers import LayerInfo, Patterns, find_layers, layer_info
from .trace import Hooks, call_model, first_tensor
from .orm import MIN_SAMPLES, HSICAccumulator, feature_gram, flatten_samples, orm_gamma
from .stages import stage

FORMAT = "ompq.Profile"
VERSION = 3  # 2: adds the per-layer, per-width distortion table; 3: batch_size, processes

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
    `distortion_bits=None`). `batch_size`: samples per micro-batch (the first batch; None for
    profiles older than version 3: one batch); `processes`: data-parallel processes.
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
    batch_size: Optional[int] = None
    processes: int = 1
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
                "batch_size": self.batch_size, "processes": self.processes,
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
                   batch_size=None if d.get("batch_size") is None else int(d["batch_size"]),
                   processes=int(d.get("processes", 1)),
                   distortion=None if d.get("distortion") is None
                   else DistortionTable.from_dict(d["distortion"]))


# ----------------------------------------------------------------------------- batches
def micro_batches(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive micro-batches of `batch_size` samples; a remainder of fewer
    than `MIN_SAMPLES` joins the batch before it (every batch then holds ≥ 4 samples)."""
    spans = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < MIN_SAMPLES:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return spans


def _check_batch_size(batch_size: Any, num_samples: int, world: int) -> int:
    """The micro-batch size: `batch_size`, or all samples (ceil(N / processes) under torchrun)."""
    if batch_size is None:
        return -(-num_samples // world)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int or None, got {batch_size!r}")
    if batch_size < MIN_SAMPLES:
        raise ValueError(f"batch_size must be at least {MIN_SAMPLES} (each micro-batch gives a "
                         f"centred Gram and an unbiased HSIC, which need 4 samples), got "
                         f"{batch_size}")
    return batch_size


def _check_num_samples(num_samples: Any) -> None:
    if isinstance(num_samples, int) and not isinstance(num_samples, bool) \
            and num_samples < MIN_SAMPLES:
        raise ValueError(f"num_samples must be at least {MIN_SAMPLES} (centred Grams and the "
                         f"debiased HSIC need N ≥ 4), got {num_samples}")


# ----------------------------------------------------------------------------- masks
MASK_KEY = "attention_mask"


class _Masks:
    """Where each micro-batch's (m, T) token mask comes from: a dict entry of the inputs (`auto`:
    only if present), a tensor drawn with the same rows as the inputs, or nowhere."""

    def __init__(self, mask: Union[str, Tensor, None], sample: Sample) -> None:
        self.auto = isinstance(mask, str) and mask == "auto"
        self.key: Optional[str] = MASK_KEY if self.auto else mask if isinstance(mask, str) \
            else None
        self.rows: Optional[Tensor] = None
        if isinstance(mask, Tensor):
            if sample.dataset or not isinstance(sample.source, (Tensor, dict)):
                raise ValueError("a mask tensor needs inputs given as a tensor or a dict of "
                                 "tensors; for a Dataset or a stream put the mask in the items "
                                 "(a dict entry) and name it: mask='attention_mask'")
            have = num_rows(sample.source)
            if mask.dim() != 2 or mask.shape[0] != have:
                raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be (N, T) with the "
                                 f"N = {have} rows of the inputs")
            self.rows = mask
        elif mask is not None and not isinstance(mask, str):
            raise TypeError(f"mask must be 'auto', None, a dict key (str) or an (N, T) tensor, got "
                            f"{type(mask).__name__}")

    def of(self, batch: Any, idx: Tensor) -> Optional[Tensor]:
        """The boolean (m, T) mask of one micro-batch (inputs `batch`, sample indices `idx`)."""
        if self.rows is not None:
            m = self.rows[idx.to(self.rows.device)]
        elif self.key is not None:
            if not isinstance(batch, dict) or self.key not in batch:
                if self.auto:
                    return None
                keys = list(batch) if isinstance(batch, dict) else []
                raise ValueError(f"mask={self.key!r} names no entry of the inputs (entries: "
                                 f"{keys or 'none: the inputs are not a dict'})")
            m = batch[self.key]
        else:
            return None
        if not isinstance(m, Tensor) or m.dim() != 2:
            raise ValueError(f"the mask must be an (N, T) tensor, got "
                             f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
        if m.dtype != torch.bool:
            if bool(((m != 0) & (m != 1)).any()):
                raise ValueError("the mask must hold 0/1 (or bools): 1 for a real token, 0 for "
                                 "padding")
            m = m != 0
        return m


def _mask_matches(x: Tensor, mask: Tensor) -> bool:
    """Whether the (m, T) mask applies to feature x: x is (m, T, …)."""
    return x.dim() >= 3 and x.shape[1] == mask.shape[1]


def _mask_feature(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Zero the padded positions of an (m, T, …) feature (dim 1 of length T); other shapes as is."""
    if mask is None or not _mask_matches(x, mask):
        return x
    keep = mask.to(x.device).reshape(mask.shape + (1,) * (x.dim() - 2))
    return x.masked_fill(~keep, 0)


def _mask_tokens(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The real tokens of an (m, T, H) layer input as a (tokens, H) matrix; other shapes as is."""
    if mask is None or x.dim() != 3 or x.shape[1] != mask.shape[1]:
        return x
    return x[mask[:x.shape[0]].to(x.device)]


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
    """Hook bookkeeping over micro-batches: pending feature chain, this batch's Grams, layer
    stats (from the first batch), distortion meters, timings."""

    def __init__(self, names: Sequence[str], feature: str, pbar: Any,
                 meters: Optional[dict[str, LayerMeter]] = None) -> None:
        self.names = set(names)
        self.meters = meters or {}
        self.distortion_seconds = 0.0
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
        self.rows, self.mask, self.first, self.meter_rows = 0, None, True, 0
        self.no_padding = True
        self.masked_layers = 0

    def begin(self, rows: int, mask: Optional[Tensor], first: bool, meter_rows: int) -> None:
        """Start a micro-batch of `rows` samples (`meter_rows` of them feed the meters)."""
        self.rows, self.mask, self.first, self.meter_rows = rows, mask, first, meter_rows
        self.no_padding = mask is None or bool(mask.all())  # nothing to zero: skip the copies
        self.grams, self.energy = {}, {}

    def end(self, order: Sequence[str]) -> tuple[Tensor, Tensor]:
        """End the batch: its L×m×m Grams and L energies, in `order`."""
        self.flush()
        if set(self.grams) != set(order):
            diff = sorted(set(order) ^ set(self.grams))
            raise ValueError(f"layer(s) {', '.join(map(repr, diff[:8]))} ran in some micro-batches "
                             "only; ompq needs the same layers to run on every sample")
        dev = self.grams[order[0]].device
        grams = torch.stack([self.grams[n].to(dev) for n in order])
        energy = torch.tensor([self.energy[n] for n in order], dtype=torch.float64)
        return grams, energy

    # -- Gram of one feature
    def _add_gram(self, name: str, x: Tensor) -> None:
        if x.shape[0] != self.rows:
            raise ValueError(f"layer {name!r} returned a tensor of shape {tuple(x.shape)}; ompq "
                             f"needs the batch of {self.rows} samples on dim 0")
        cuda = x.is_cuda
        if cuda:  # time the Gram work alone
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        matches = self.mask is not None and _mask_matches(x, self.mask)
        if self.first and matches:
            self.masked_layers += 1
        try:
            if matches and not self.no_padding:
                gram = feature_gram(_mask_feature(x, self.mask)) if x.dtype == torch.float64 \
                    else ops.centered_gram_masked(x, self.mask)  # no masked copy on CPU
                energy = _energy_estimate(_mask_feature(x[:1], self.mask[:1])) * x.shape[0]
            else:
                gram = feature_gram(x)
                energy = _energy_estimate(x)  # float(): waits for the GPU too
        except ValueError as err:  # the compiled op refuses NaN/Inf: name the layer
            raise ValueError(f"layer {name!r} has a non-finite feature: {err}") from err
        if gram.dtype != torch.float32:
            gram = gram.float()
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
            if self.first:
                info = layer_info(name, module, inp, o)
                if name in self.infos:
                    self.infos[name].macs += info.macs
                else:
                    self.infos[name] = info
            if name in self.meters and self.meter_rows > 0:
                t0 = time.perf_counter()
                x = inp[:self.meter_rows]
                if isinstance(module, nn.Linear) and not self.no_padding:
                    x = _mask_tokens(x, self.mask)
                self.meters[name].update(module, x, o)
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


def _run_input(model: nn.Module, x: Any, memory_format: str) -> Any:
    """The input of the profiling forward: channels_last for 4-D tensor inputs of models with a
    Conv2d ("auto"; oneDNN/cuDNN convolutions run faster on it, ~1.4× for a ResNet-50 on 2 CPU
    threads, and the Grams do not depend on the layout), x itself otherwise (and for dict or
    tuple inputs)."""
    if not isinstance(x, Tensor):
        if memory_format == "channels_last":
            raise ValueError("memory_format='channels_last' needs a single 4-D (N, C, H, W) "
                             "tensor input; use 'auto' or 'preserve'")
        return x
    if x.dim() != 4 and memory_format == "channels_last":
        raise ValueError(f"memory_format='channels_last' needs a 4-D (N, C, H, W) input, got "
                         f"shape {tuple(x.shape)}; use 'auto' or 'preserve'")
    if x.dim() != 4 or memory_format == "preserve":
        return x
    if memory_format == "auto" and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _meters(model: nn.Module, layers: list, example: Any, bits: Optional[tuple[int, ...]],
            samples: int) -> dict[str, LayerMeter]:
    """One distortion meter per layer (none when `bits` is None), with PTQ's BN folding."""
    if bits is None:
        return {}
    scales = fold_scales(model, example)
    return {n: LayerMeter(bits, samples, scales.get(n), m.weight.shape[0]) for n, m in layers}


@dataclass
class _Plan:
    """What one process profiles: the drawn sample, its micro-batches (this rank's share),
    masks, the device and the estimator."""

    sample: Sample
    spans: list[tuple[int, int]]
    mine: list[tuple[int, int]]
    masks: _Masks
    target: torch.device
    debiased: bool
    dist_samples: int
    world: int
    rank: int


def _batch_inputs(plan: _Plan, span: tuple[int, int]) -> tuple[Any, Optional[Tensor]]:
    """One micro-batch's inputs (on the target device) and its token mask."""
    x = to_device(plan.sample.rows(*span), plan.target)
    mask = plan.masks.of(x, plan.sample.idx[span[0]:span[1]])
    if mask is not None and mask.shape[0] != span[1] - span[0]:
        raise ValueError(f"the mask has {mask.shape[0]} rows for a batch of "
                         f"{span[1] - span[0]} samples")
    return x, None if mask is None else mask.to(plan.target)


def _record(model: nn.Module, layers: list, plan: _Plan, feature: str, progress: bool,
            bits: Optional[tuple[int, ...]], memory_format: str
            ) -> tuple[_Recorder, HSICAccumulator, float]:
    """The hooked inference forwards of this rank's micro-batches; returns the recorder, the
    HSIC sums and the forwards' seconds (Gram and meter work included)."""
    example, _ = _batch_inputs(plan, (plan.mine[0][0], plan.mine[0][0] + 2))
    _run_input(model, example, memory_format)  # a bad memory_format fails before any forward
    meters = _meters(model, layers, example, bits, plan.dist_samples)
    pbar = _make_pbar(len(layers) * len(plan.mine), progress and plan.rank == 0)
    rec = _Recorder([n for n, _ in layers], feature, pbar, meters)
    acc = HSICAccumulator(plan.debiased)
    order: list[str] = []
    seconds = 0.0
    try:
        with _register(model, layers, rec, feature):
            for k, span in enumerate(plan.mine):
                x, mask = _batch_inputs(plan, span)
                rows = span[1] - span[0]
                rec.begin(rows, mask, k == 0, max(0, min(span[1], plan.dist_samples) - span[0]))
                t0 = time.perf_counter()
                with torch.inference_mode():
                    call_model(model, _run_input(model, x, memory_format))
                    rec.flush()
                    if k == 0:
                        order = list(rec.infos)
                        acc.names = order
                        _check_mask_used(rec, mask, order)
                    grams, energy = rec.end(order)
                    acc.add(grams, energy)
                if grams.is_cuda:
                    torch.cuda.synchronize(grams.device)
                seconds += time.perf_counter() - t0
        return rec, acc, seconds
    finally:
        if pbar is not None:
            pbar.close()


def _check_mask_used(rec: _Recorder, mask: Optional[Tensor], order: Sequence[str]) -> None:
    """A mask that matches no layer's feature (dim 1 of length T) is a shape mistake."""
    if mask is None or rec.masked_layers > 0:
        return
    shapes = ", ".join(f"{n!r} {rec.infos[n].out_shape}" for n in order[:4])
    raise ValueError(f"the mask has T = {mask.shape[1]} positions, but no layer's feature has "
                     f"{mask.shape[1]} positions on dim 1 (per-sample output shapes: {shapes}, "
                     "…); give an (N, T) mask whose T is the sequence length")


def _reduce(rec: _Recorder, acc: HSICAccumulator, order: Sequence[str]) -> float:
    """Sum the HSIC sums and the distortion meters over all processes; returns the seconds."""
    state, seconds = all_reduce(acc.state())
    acc.load_state(state)
    if rec.meters:
        states = [rec.meters[n].state() for n in order]
        weight, t1 = all_reduce(torch.stack([w for w, _ in states]), op="max")
        sums, t2 = all_reduce(torch.cat([s for _, s in states]))
        start = 0
        for n, w, (_, s) in zip(order, weight, states):
            rec.meters[n].load_state(w, sums[start:start + s.numel()])
            start += s.numel()
        seconds += t1 + t2
    return seconds


def _plan(model: nn.Module, inputs: Any, num_samples: int, seed: int, batch_size: Any,
          debiased: Optional[bool], mask: Any, device: Any, distortion_samples: int) -> _Plan:
    """Draw the samples and split them into micro-batches and ranks; check every argument."""
    _check_num_samples(num_samples)
    rank, world = rank_world()
    sample = draw_sample(inputs, num_samples, seed, keep_order=True, strict=True)
    size = _check_batch_size(batch_size, num_samples, world)
    spans = micro_batches(num_samples, size)
    if len(spans) < world:
        raise ValueError(f"{len(spans)} micro-batch(es) of {size} samples for {world} processes; "
                         f"every process needs one: lower batch_size to at most "
                         f"{max(MIN_SAMPLES, num_samples // world)}")
    if debiased is None:
        debiased = len(spans) > 1
    elif not debiased and len(spans) > 1:
        raise ValueError(f"debiased=False with {len(spans)} micro-batches: the minibatch "
                         "estimator sums unbiased HSIC estimates; pass debiased=True (or None), "
                         "or batch_size >= num_samples for the biased full-batch ORM")
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    return _Plan(sample=sample, spans=spans, mine=spans[rank::world],
                 masks=_Masks(mask, sample), target=target, debiased=bool(debiased),
                 dist_samples=min(distortion_samples, num_samples), world=world, rank=rank)


@stage("profiling")
def profile(model: nn.Module, inputs: Any, *, num_samples: int = 64, seed: int = 0,
            include: Patterns = None, exclude: Patterns = None,
            types: Optional[tuple[type, ...]] = None, feature: str = "auto",
            debiased: Optional[bool] = None, device: Optional[Union[str, torch.device]] = None,
            progress: bool = True, description: Optional[str] = None,
            memory_format: str = "auto",
            distortion_bits: Optional[Sequence[int]] = DISTORTION_BITS,
            distortion_samples: int = DEFAULT_SAMPLES, batch_size: Optional[int] = None,
            mask: Union[str, Tensor, None] = "auto") -> Profile:
    """Profile `model`: layer stats and the L×L ORM from streaming inference forwards.

    `inputs`: inputs with ≥ `num_samples` rows (a tensor, or a dict of tensors passed as keyword
    arguments), an `(inputs, labels)` pair, a Dataset or an iterable of batches (see
    `ompq.data.sample_inputs`); `num_samples` (≥ 4) are drawn with `seed`. The model runs in eval
    mode under `torch.inference_mode()` where it is (its training flag is restored; on `device`
    when given, then moved back). `include`/`exclude`/`types` select layers as in `find_layers`.
    `feature`: "auto" (after a directly following BN/activation) or "output" (raw layer output).
    `batch_size` (≥ 4; default all samples): micro-batches of that many samples, each reduced to
    its Grams at once, so memory does not grow with N; their unbiased HSIC estimates are summed
    (minibatch CKA). `debiased`: the unbiased HSIC (None: only when micro-batched).
    `mask`: token mask of (N, T) inputs: "auto" (the `attention_mask` entry of dict inputs,
    if any), a dict key, an (N, T) tensor drawn with the inputs, or None; padded positions of
    every (m, T, …) feature are zeroed. Under `torchrun` each process profiles its share of the
    micro-batches (default batch: N / processes) and the sums are all-reduced; every process
    returns the same Profile (progress bars on rank 0 only). `memory_format`: "auto" feeds a
    4-D tensor input to a model with Conv2d layers in channels_last (a forward that fails on it
    is rerun once as drawn, with a warning), "channels_last" always, "preserve" never. `distortion_bits`: widths of the
    distortion table (None skips it), measured on the first `distortion_samples` samples.
    Returns a `Profile` whose layers are in execution order; selected layers that do not run
    raise ValueError. Details: docs/DESIGN.md, "Profiler".
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
    layers = find_layers(model, include=include, exclude=exclude, types=types)
    plan = _plan(model, inputs, num_samples, seed, batch_size, debiased, mask, device,
                 distortion_samples)
    home = _model_device(model)
    was_training = model.training
    if plan.target != home:
        model.to(plan.target)
    try:
        model.eval()
        try:
            rec, acc, t_forward = _record(model, layers, plan, feature, progress, bits,
                                          memory_format)
        except RuntimeError as err:
            first = plan.sample.rows(0, 1)
            if memory_format != "auto" or _run_input(model, first, "auto") is first:
                raise
            warnings.warn(f"ompq.profile: the forward failed on a channels_last input ({err}); "
                          "rerunning it on the input as drawn (memory_format='preserve' skips "
                          "the attempt)", RuntimeWarning, stacklevel=2)
            rec, acc, t_forward = _record(model, layers, plan, feature, progress, bits,
                                          "preserve")
    finally:
        model.train(was_training)
        if plan.target != home:
            model.to(home)
    not_run = [n for n, _ in layers if n not in rec.infos]
    if not_run:
        raise ValueError(f"layer(s) {', '.join(repr(n) for n in not_run[:8])} did not run in "
                         "the forward pass; exclude them (exclude=...)")
    order = list(rec.infos)
    t_comm = _reduce(rec, acc, order) if plan.world > 1 else 0.0
    t1 = time.perf_counter()
    orm = acc.orm().cpu()
    t_orm = time.perf_counter() - t1
    table = table_from_meters(rec.meters, order, bits, plan.dist_samples) if bits else None
    timings = {"forward": t_forward - rec.gram_seconds - rec.distortion_seconds,
               "gram": rec.gram_seconds, "distortion": rec.distortion_seconds, "orm": t_orm,
               "total": time.perf_counter() - t_start}
    if plan.world > 1:
        timings["comm"] = t_comm
    size = plan.spans[0][1] - plan.spans[0][0]
    return Profile(layers=[rec.infos[n] for n in order], orm=orm, num_samples=num_samples,
                   seed=seed, feature=feature, debiased=plan.debiased, timings=timings,
                   model=description if description is not None else type(model).__name__,
                   distortion=table, batch_size=size, processes=plan.world)
