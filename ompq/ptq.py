"""Post-training quantization (SPEC §5): BN folding, scale init, BRECQ-style block
reconstruction with AdaRound, then LSQ learning of the activation step sizes.

`ptq(model, bit_config, data, PTQConfig(...))` returns a `PTQResult` (the quantized copy and its
statistics). Blocks come from the module tree of any model (`find_blocks`). The loss, schedule
and the CPU/GPU iteration defaults are described in docs/DESIGN.md ("PTQ").
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import ops
from ._jsonio import fields_to_json
from .batchnorm import fold_bn
from .data import sample_inputs
from .layers import QUANTIZABLE_TYPES, Patterns
from .quantize import (QuantScheme, calibrate_activations, float_weight, quantize_,
                       set_act_quant, weight_quantizer, with_options)
from .quantizers import ActQuantizer, WeightQuantizer
from .inputs import num_rows, slice_rows, to_device
from .trace import Hooks, call_model, main_output
from .stages import stage

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class PTQConfig:
    """Settings of `ptq`.

    `num_samples`: calibration samples (1 024 as BRECQ); `iters`: AdaRound iterations per block
    (None: 20 000 on a GPU, 500 on CPU; 0 or `adaround=False`: round to nearest); `act_iters`:
    LSQ iterations per block for the activation step sizes (None: 5 000 GPU, 100 CPU; 0 keeps
    the EMA ranges); `batch_size`: reconstruction mini-batch; `seed`: calibration draw and
    mini-batches; `lr`/`act_lr`, `reg_weight`, `warmup` (fraction), `beta_range`, `p`: the
    AdaRound/LSQ optimisation; `scheme`, `act_bits`, `skip`: as `quantize_`.
    """

    num_samples: int = 1024
    iters: Optional[int] = None
    act_iters: Optional[int] = None
    batch_size: int = 32
    seed: int = 0
    progress: bool = True
    lr: float = 1e-3
    act_lr: float = 4e-4
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_range: tuple[float, float] = (20.0, 2.0)
    p: float = 2.4
    adaround: bool = True
    act_bits: Union[int, dict, None] = None
    skip: Patterns = None
    device: Union[str, torch.device, None] = None
    scheme: QuantScheme = field(default_factory=QuantScheme)


@dataclass
class PTQResult:
    """What `ptq` returns: the quantized `model` (eval mode) and its statistics.

    `blocks`: reconstruction blocks in execution order; `block_losses`: per block, the last
    reconstruction and rounding losses; `iters`/`act_iters`: iterations per block used;
    `seconds_*`: wall time (s) of the weight stage, the activation stage and the whole call.
    """

    model: nn.Module
    blocks: list[str]
    block_losses: dict[str, dict[str, float]]
    iters: int
    act_iters: int
    seconds_weights: float
    seconds_acts: float
    seconds: float

    def stats(self) -> dict[str, Any]:
        """The statistics as a JSON-serialisable dict (everything but the model)."""
        return fields_to_json(self, exclude=("model",))


def _progress(it: Iterable, progress: bool, desc: str, total: Optional[int] = None):
    if not progress:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, total=total, leave=False)


class _Stop(Exception):
    """Raised inside a hook to end a forward early."""


def _has_quant_layer(m: nn.Module) -> bool:
    return any(isinstance(x, QUANTIZABLE_TYPES) for x in m.modules())


def find_blocks(model: nn.Module, example_input: Any) -> list[str]:
    """Reconstruction blocks of any model, in execution order (see docs/DESIGN.md, "PTQ").

    A block is a module path whose module contains ≥ 1 quantizable layer and that one forward of
    `example_input` (inputs of any form) calls exactly once, with the batch as its first
    positional tensor argument, returning a tensor (or a tuple whose first element is one).
    Other arguments (attention masks, …) are replayed as the forward passed them.

    Raises:
        ValueError: a quantizable layer is called more than once (shared weights) or a layer is
            not covered by any block.
    """
    def candidates(module: nn.Module, prefix: str) -> list[str]:
        out = []
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if not _has_quant_layer(child):
                continue
            if isinstance(child, _CONTAINERS):
                out.extend(candidates(child, full + "."))
            else:
                out.append(full)
        return out

    todo = candidates(model, "")
    if not todo and isinstance(model, QUANTIZABLE_TYPES):
        return [""]
    blocks: list[str] = []
    info: dict[str, tuple[int, bool, int]] = {}
    while todo:
        # The found blocks are traced again so that the last round ranks all of them.
        info = _trace(model, blocks + todo, example_input)
        nxt = []
        for name in todo:
            calls, ok_io, _ = info[name]
            if calls == 1 and ok_io:
                blocks.append(name)
                continue
            mod = model.get_submodule(name)
            if isinstance(mod, QUANTIZABLE_TYPES):
                raise ValueError(f"layer {name!r} is called {calls} times per forward (or with "
                                 "non-tensor input); PTQ block reconstruction needs each "
                                 "quantizable layer called exactly once")
            nxt.extend(candidates(mod, name + "."))
        todo = nxt
    return sorted(blocks, key=lambda b: info[b][2])  # rank of the first call, last round


def _trace(model: nn.Module, names: Sequence[str], x: Any) -> dict[str, tuple[int, bool, int]]:
    """One no-grad forward of x with hooks on the named submodules. Per name: how many times it
    was called, whether every call took the batch as its first positional tensor and returned
    a main output tensor, and the rank of its first call among the named modules (-1 if never
    called)."""
    rows = num_rows(x)
    info = {n: [0, True, -1] for n in names}
    started = [0]

    def pre_hook(n: str):
        def hook(mod, inp) -> None:
            if info[n][2] < 0:
                info[n][2] = started[0]
                started[0] += 1
        return hook

    def hook(n: str):
        def fn(mod, inp, out) -> None:
            info[n][0] += 1
            if not inp or not isinstance(inp[0], Tensor) or inp[0].dim() == 0 \
                    or inp[0].shape[0] != rows or main_output(out) is None:
                info[n][1] = False
        return fn

    with Hooks() as hooks, torch.no_grad():
        for n in names:
            sub = model.get_submodule(n)
            hooks.pre(sub, pre_hook(n))
            hooks.post(sub, hook(n))
        call_model(model, x)
    return {n: (c, ok, first) for n, (c, ok, first) in info.items()}


@dataclass
class BlockInputs:
    """A block's arguments over the calibration set: tensors that carry the batch (dim 0 of
    the chunk's size in every call) are concatenated, other values kept as the first call
    passed them. `call(block, idx)` runs the block on samples `idx` and returns its main
    output."""

    args: list
    kwargs: dict
    batched_args: set
    batched_kwargs: set
    rows: int

    def call(self, block: nn.Module, idx: Optional[Tensor] = None) -> Tensor:
        args = [a[idx] if idx is not None and i in self.batched_args else a
                for i, a in enumerate(self.args)]
        kwargs = {k: v[idx] if idx is not None and k in self.batched_kwargs else v
                  for k, v in self.kwargs.items()}
        return main_output(block(*args, **kwargs))


def _batched(values: list, sizes: list[int]) -> bool:
    return all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == s
               for v, s in zip(values, sizes))


def _block_inputs(calls: list[tuple[tuple, dict]], sizes: list[int]) -> BlockInputs:
    """Merge the captured (args, kwargs) of each chunk into one `BlockInputs`."""
    first_args, first_kwargs = calls[0]
    args, batched_args = [], set()
    for i, a in enumerate(first_args):
        column = [c[0][i] for c in calls]
        if _batched(column, sizes):
            args.append(torch.cat(column))
            batched_args.add(i)
        else:
            args.append(a)
    kwargs, batched_kwargs = {}, set()
    for k, v in first_kwargs.items():
        column = [c[1][k] for c in calls]
        if _batched(column, sizes):
            kwargs[k] = torch.cat(column)
            batched_kwargs.add(k)
        else:
            kwargs[k] = v
    return BlockInputs(args, kwargs, batched_args, batched_kwargs, sum(sizes))


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, Tensor) else v


@torch.no_grad()
def _capture_inputs(model: nn.Module, block: nn.Module, x: Any, batch_size: int) -> BlockInputs:
    """The block's arguments (before its own input quantizer) over all of x, stopping each
    forward early."""
    calls: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        calls.append((tuple(_detach(a) for a in args),
                      {k: _detach(v) for k, v in kwargs.items()}))
        raise _Stop

    with Hooks() as hooks:
        hooks.pre(block, grab, first=True, with_kwargs=True)
        sizes = _run_chunks(model, x, batch_size)
    return _block_inputs(calls, sizes)


@torch.no_grad()
def _capture_outputs(model: nn.Module, block: nn.Module, x: Any, batch_size: int) -> Tensor:
    """The block's main output over all of x, stopping each forward early."""
    chunks: list[Tensor] = []

    def grab(mod, inp, out):
        chunks.append(main_output(out).detach())
        raise _Stop

    with Hooks() as hooks:
        hooks.post(block, grab)
        _run_chunks(model, x, batch_size)
    return torch.cat(chunks)


def _run_chunks(model: nn.Module, x: Any, batch_size: int) -> list[int]:
    """Forward x chunk by chunk, each forward possibly ended early by a hook (`_Stop`); returns
    the chunks' sizes."""
    sizes = []
    for chunk in _chunks(x, batch_size):
        sizes.append(num_rows(chunk))
        try:
            call_model(model, chunk)
        except _Stop:
            pass
    return sizes


def _chunks(x: Any, batch_size: int) -> list[Any]:
    n = num_rows(x)
    return [slice_rows(x, i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def lp_loss(pred: Tensor, target: Tensor, p: float = 2.4) -> Tensor:
    """BRECQ's reconstruction loss: Σ over features of |pred − target|^p, mean over samples."""
    return (pred - target).abs().pow(p).reshape(pred.size(0), -1).sum(1).mean()


def _weight_quantizers(block: nn.Module) -> list[tuple[nn.Parameter, WeightQuantizer]]:
    """(float weight, its quantizer) of every quantized layer in `block`."""
    return [(float_weight(m), weight_quantizer(m)) for m in block.modules()
            if weight_quantizer(m) is not None]


def _reconstruct_weights(block: nn.Module, inp: BlockInputs, tgt: Tensor, *, iters: int,
                         batch_size: int, lr: float, reg_weight: float, warmup: float,
                         beta_range: tuple[float, float], p: float, gen: torch.Generator,
                         progress: bool, desc: str) -> dict[str, float]:
    layers = _weight_quantizers(block)
    alphas = [wq.init_adaround(w) for w, wq in layers]
    opt = torch.optim.Adam(alphas, lr=lr)
    warm = int(warmup * iters)
    b0, b1 = beta_range
    rec = reg = torch.zeros(())
    for it in _progress(range(iters), progress, desc):
        idx = torch.randint(0, inp.rows, (min(batch_size, inp.rows),), generator=gen)
        idx = idx.to(tgt.device)
        rec = lp_loss(inp.call(block, idx), tgt[idx], p)
        loss = rec
        if it >= warm:
            t = (it - warm) / max(iters - warm, 1)
            beta = b1 + (b0 - b1) * max(0.0, 1.0 - t)
            reg = reg_weight * sum(ops.adaround_reg(a, beta) for a in alphas)
            loss = rec + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for w, wq in layers:
        wq.bake_adaround(w)
    return {"rec_loss": float(rec.detach()), "round_loss": float(reg.detach())}


def _learn_act_scales(block: nn.Module, inp: BlockInputs, tgt: Tensor, *, iters: int,
                      batch_size: int,
                      lr: float, p: float, gen: torch.Generator, progress: bool, desc: str
                      ) -> None:
    aqs = [m for m in block.modules() if isinstance(m, ActQuantizer) and m.enabled]
    if not aqs or iters <= 0:
        return
    for aq in aqs:
        aq.set_mode("lsq")
    opt = torch.optim.Adam([aq.scale for aq in aqs], lr=lr)
    for _ in _progress(range(iters), progress, desc):
        idx = torch.randint(0, inp.rows, (min(batch_size, inp.rows),), generator=gen)
        idx = idx.to(tgt.device)
        loss = lp_loss(inp.call(block, idx), tgt[idx], p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for aq in aqs:
                aq.scale.clamp_(min=1e-8)
    for aq in aqs:
        aq.set_mode("fixed")


@stage("PTQ")
def ptq(model: nn.Module, bit_config: Any, calib_data: Any,
        config: Optional[PTQConfig] = None, **options: Any) -> PTQResult:
    """Quantize a copy of `model` to `bit_config` with BRECQ-style PTQ.

    Args:
        model: the full-precision model (not modified).
        bit_config: anything `quantize_` accepts (a BitConfig, a dict layer -> weight bits).
        calib_data: calibration inputs of any form (see `ompq.data.sample_inputs`: a tensor, a
            dict of keyword tensors, a Dataset, ...); labels are not used.
        config: a `PTQConfig`; `**options` override its fields (and its scheme's), e.g.
            `ptq(model, cfg, data, iters=0)`.

    Returns:
        A `PTQResult`: `.model` in eval mode, with every parameter frozen, and the statistics.
    """
    cfg = with_options(config if config is not None else PTQConfig(), options)
    t0 = time.perf_counter()
    dev = torch.device(cfg.device) if cfg.device is not None else _model_device(model)
    on_gpu = dev.type == "cuda"
    iters = (20000 if on_gpu else 500) if cfg.iters is None else int(cfg.iters)
    act_iters = (5000 if on_gpu else 100) if cfg.act_iters is None else int(cfg.act_iters)
    if not cfg.adaround:
        iters = 0
    x = to_device(sample_inputs(calib_data, cfg.num_samples, cfg.seed), dev)
    example = slice_rows(x, 0, 8)
    fp = copy.deepcopy(model).to(dev).eval()
    fold_bn(fp, example)
    for prm in fp.parameters():
        prm.requires_grad_(False)
    q = copy.deepcopy(fp)
    quantize_(q, bit_config, cfg.scheme, act_bits=cfg.act_bits, skip=cfg.skip)
    set_act_quant(q, False)
    blocks = find_blocks(q, example)
    cap_bs = max(cfg.batch_size, 128)
    losses: dict[str, dict[str, float]] = {}
    if iters > 0:
        for bi, name in enumerate(_progress(blocks, cfg.progress, "PTQ blocks (AdaRound)")):
            qb = q.get_submodule(name) if name else q
            if not _weight_quantizers(qb):
                continue
            tgt = _capture_outputs(fp, fp.get_submodule(name) if name else fp, x, cap_bs)
            inp = _capture_inputs(q, qb, x, cap_bs)
            g = torch.Generator().manual_seed(cfg.seed * 1000003 + bi)
            losses[name] = _reconstruct_weights(
                qb, inp, tgt, iters=iters, batch_size=cfg.batch_size, lr=cfg.lr,
                reg_weight=cfg.reg_weight, warmup=cfg.warmup, beta_range=cfg.beta_range,
                p=cfg.p, gen=g, progress=False, desc=f"block {name}")
    t1 = time.perf_counter()
    calibrate_activations(q, _chunks(x, cap_bs))
    if act_iters > 0:
        for bi, name in enumerate(_progress(blocks, cfg.progress, "PTQ blocks (LSQ act)")):
            qb = q.get_submodule(name) if name else q
            tgt = _capture_outputs(fp, fp.get_submodule(name) if name else fp, x, cap_bs)
            inp = _capture_inputs(q, qb, x, cap_bs)
            g = torch.Generator().manual_seed(cfg.seed * 1000003 + 7919 + bi)
            _learn_act_scales(qb, inp, tgt, iters=act_iters, batch_size=cfg.batch_size,
                              lr=cfg.act_lr, p=cfg.p, gen=g, progress=False, desc=f"act {name}")
    for prm in q.parameters():
        prm.requires_grad_(False)
    q.eval()
    t2 = time.perf_counter()
    return PTQResult(model=q, blocks=blocks, block_losses=losses, iters=iters,
                     act_iters=act_iters, seconds_weights=t1 - t0, seconds_acts=t2 - t1,
                     seconds=t2 - t0)


def _model_device(model: nn.Module) -> torch.device:
    for prm in model.parameters():
        return prm.device
    return torch.device("cpu")
