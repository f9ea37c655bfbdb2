"""Post-training quantization: BN folding, scale init, BRECQ-style block reconstruction with
AdaRound, then LSQ learning of the activation step sizes (SPEC §5).

Blocks are found from the module tree of any model (`find_blocks`): each child module that
contains at least one quantizable layer is a block, except plain containers (`nn.Sequential`,
`nn.ModuleList`, `nn.ModuleDict`) which are walked into, and children that the forward does not
call exactly once with one tensor (walked into as well). So a ResNet gives its stem conv, each
residual block and the classifier; a MobileNetV2 each inverted residual.

For each block, in execution order, the quantized model's block input (the output of the already
quantized earlier blocks) is cached for the calibration set and the block learns its AdaRound
rounding variables to reproduce the full-precision model's block output: Adam (lr 1e-3), loss
``mean_n Σ |ŷ − y|^p`` (p = 2.4) plus ``reg_weight · Σ (1 − |2h(V) − 1|^β)`` with reg_weight 0.01,
β annealed linearly 20 → 2 after a 20 % warm-up without the rounding loss. The learned (hard)
rounding is then written into the weights. Second stage: the activation quantizers are calibrated
(EMA) on the quantized model and their step sizes learned block by block (LSQ, Adam lr 4e-4,
same Lp loss with p = 2.4).

The paper uses 20 000 / 5 000 iterations per block; the defaults here are scaled to the hardware:
``iters`` = 20 000 on a GPU and 500 on CPU, ``act_iters`` = 5 000 on a GPU and 100 on CPU.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import ops
from .data import draw_indices, read_batches, stack_items
from .quantizers import (ActQuantizer, QUANT_LAYER_TYPES, QUANTIZABLE_TYPES, WeightQuantizer,
                         calibrate_activations, fold_bn, quantize_, set_act_quant)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Stop(Exception):
    """Raised inside a hook to end a forward early."""


def _progress(it: Iterable, progress: bool, desc: str, total: Optional[int] = None):
    if not progress:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, total=total, leave=False)


def sample_inputs(data: Any, num_samples: int, seed: int = 0) -> Tensor:
    """Draw `num_samples` inputs (a tensor, N × …) from `data` with a local generator.

    `data`: a tensor of inputs, a tuple/list `(inputs, labels)` of tensors, a map-style Dataset
    (items `x` or `(x, y, …)`), or an iterable of batches (tensors or `(x, y)`; the first
    `num_samples` are taken in order). Data with no sample raises ValueError; fewer than
    `num_samples` samples warn and are all used.
    """
    return _draw_calibration(data, num_samples, seed)


_VALID_CALIBRATION = ("give at least 1 sample: a tensor N × … (N ≥ 1), an (inputs, labels) "
                      "pair, a non-empty Dataset or an iterable of non-empty batches")


def _draw_calibration(data: Any, num_samples: int, seed: int) -> Tensor:
    """`sample_inputs`; called directly by `ptq` so that both warn at the user's line."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        data = data[0]
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.size(0) == 0:
            raise ValueError(f"calibration data is empty (a tensor of shape "
                             f"{tuple(data.shape)}); {_VALID_CALIBRATION}")
        _warn_short(data.size(0), num_samples)
        return data[draw_indices(data.size(0), num_samples, seed)]
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and \
            not isinstance(data, torch.utils.data.DataLoader):
        n = len(data)
        if n == 0:
            raise ValueError(f"calibration data is empty (a Dataset of length 0); "
                             f"{_VALID_CALIBRATION}")
        _warn_short(n, num_samples)
        return stack_items(data, draw_indices(n, num_samples, seed))
    pool, got = read_batches(data, num_samples)
    if pool is None or got == 0:
        what = "no batches" if pool is None else "batches of 0 samples"
        raise ValueError(f"calibration data is empty (it yielded {what}); {_VALID_CALIBRATION}")
    _warn_short(got, num_samples)
    return pool[:num_samples]


def _warn_short(available: int, num_samples: int) -> None:
    """Say so when the calibration data holds fewer samples than asked for (all are used);
    the warning points at the line that called `sample_inputs` or `ptq`."""
    if available < num_samples:
        warnings.warn(f"calibration data holds {available} samples, fewer than num_samples = "
                      f"{num_samples}; calibrating on all {available}", UserWarning, stacklevel=4)


def _has_quant_layer(m: nn.Module) -> bool:
    return any(isinstance(x, QUANTIZABLE_TYPES) for x in m.modules())


def find_blocks(model: nn.Module, example_input: Tensor) -> list[str]:
    """Reconstruction blocks of any model, in execution order (see module docstring).

    A block is a module path whose module contains ≥ 1 quantizable layer and that one forward of
    `example_input` calls exactly once with a single tensor input and a tensor output.

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


def _trace(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, tuple[int, bool, int]]:
    """One no-grad forward of x with hooks on the named submodules. Per name: how many times it
    was called, whether every call took one tensor and returned a tensor, and the rank of its
    first call among the named modules (-1 if never called)."""
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
            if len(inp) != 1 or not isinstance(inp[0], Tensor) or not isinstance(out, Tensor):
                info[n][1] = False
        return fn

    handles = []
    for n in names:
        sub = model.get_submodule(n)
        handles += [sub.register_forward_pre_hook(pre_hook(n)), sub.register_forward_hook(hook(n))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (c, ok, first) for n, (c, ok, first) in info.items()}


@torch.no_grad()
def _capture(model: nn.Module, block: nn.Module, x: Tensor, batch_size: int, *, want: str
             ) -> Tensor:
    """Block input (`want="input"`) or output over all of x, stopping each forward early."""
    chunks: list[Tensor] = []

    def hook(mod, inp, out):
        chunks.append((inp[0] if want == "input" else out).detach())
        raise _Stop

    h = block.register_forward_hook(hook)
    try:
        for i in range(0, x.size(0), batch_size):
            try:
                model(x[i:i + batch_size])
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(chunks)


def lp_loss(pred: Tensor, target: Tensor, p: float = 2.4) -> Tensor:
    """BRECQ's reconstruction loss: Σ over features of |pred − target|^p, mean over samples."""
    return (pred - target).abs().pow(p).reshape(pred.size(0), -1).sum(1).mean()


def _weight_quantizers(block: nn.Module) -> list[tuple[nn.Module, WeightQuantizer]]:
    return [(m, m.weight_quantizer) for m in block.modules() if isinstance(m, QUANT_LAYER_TYPES)]


def _reconstruct_weights(block: nn.Module, inp: Tensor, tgt: Tensor, *, iters: int,
                         batch_size: int, lr: float, reg_weight: float, warmup: float,
                         beta_range: tuple[float, float], p: float, gen: torch.Generator,
                         progress: bool, desc: str) -> dict[str, float]:
    layers = _weight_quantizers(block)
    alphas = [wq.init_adaround(m.weight) for m, wq in layers]
    opt = torch.optim.Adam(alphas, lr=lr)
    warm = int(warmup * iters)
    b0, b1 = beta_range
    rec = reg = torch.zeros(())
    for it in _progress(range(iters), progress, desc):
        idx = torch.randint(0, inp.size(0), (min(batch_size, inp.size(0)),), generator=gen)
        idx = idx.to(inp.device)
        rec = lp_loss(block(inp[idx]), tgt[idx], p)
        loss = rec
        if it >= warm:
            t = (it - warm) / max(iters - warm, 1)
            beta = b1 + (b0 - b1) * max(0.0, 1.0 - t)
            reg = reg_weight * sum(ops.adaround_reg(a, beta) for a in alphas)
            loss = rec + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for m, wq in layers:
        wq.bake_adaround(m.weight)
    return {"rec_loss": float(rec.detach()), "round_loss": float(reg.detach())}


def _learn_act_scales(block: nn.Module, inp: Tensor, tgt: Tensor, *, iters: int, batch_size: int,
                      lr: float, p: float, gen: torch.Generator, progress: bool, desc: str
                      ) -> None:
    aqs = [m for m in block.modules() if isinstance(m, ActQuantizer) and m.enabled]
    if not aqs or iters <= 0:
        return
    for aq in aqs:
        aq.set_mode("lsq")
    opt = torch.optim.Adam([aq.scale for aq in aqs], lr=lr)
    for _ in _progress(range(iters), progress, desc):
        idx = torch.randint(0, inp.size(0), (min(batch_size, inp.size(0)),), generator=gen)
        idx = idx.to(inp.device)
        loss = lp_loss(block(inp[idx]), tgt[idx], p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for aq in aqs:
                aq.scale.clamp_(min=1e-8)
    for aq in aqs:
        aq.set_mode("fixed")


def ptq(model: nn.Module, bit_config: Any, calib_data: Any, *, num_samples: int = 1024,
        iters: Optional[int] = None, act_iters: Optional[int] = None, batch_size: int = 32,
        weight_init: str = "mse", seed: int = 0, progress: bool = True, lr: float = 1e-3,
        act_lr: float = 4e-4, reg_weight: float = 0.01, warmup: float = 0.2,
        beta_range: tuple[float, float] = (20.0, 2.0), p: float = 2.4,
        act_bits: Union[int, dict, None] = None, quantize_input: bool = True,
        skip: Union[str, Sequence[str], None] = None, adaround: bool = True,
        device: Union[str, torch.device, None] = None, stats: Optional[dict] = None
        ) -> nn.Module:
    """Quantize a copy of `model` to `bit_config` with BRECQ-style PTQ; returns it in eval mode.

    Args:
        model: the full-precision model (not modified).
        bit_config: `BitConfig` or dict layer name -> weight bits (see `quantize_`).
        calib_data: calibration inputs (see `sample_inputs`); labels are not used.
        num_samples: calibration samples (1 024 as BRECQ).
        iters: AdaRound iterations per block (default 20 000 on GPU, 500 on CPU); 0 or
            `adaround=False` gives round-to-nearest weights.
        act_iters: LSQ iterations per block for the activation step sizes (default 5 000 on GPU,
            100 on CPU); 0 keeps the EMA-calibrated ranges.
        batch_size: reconstruction mini-batch (32).
        weight_init: weight scale init ("mse", "percentile", "minmax").
        seed: seeds the calibration sample and the mini-batch draws (deterministic).
        stats: optional dict filled with timings (seconds) and per-block losses.
    Other arguments: learning rates, rounding-loss weight, warm-up fraction, β schedule, Lp
    exponent, activation bits, first-input quantization and skipped layers (see `quantize_`).
    """
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else _model_device(model)
    on_gpu = dev.type == "cuda"
    iters = (20000 if on_gpu else 500) if iters is None else int(iters)
    act_iters = (5000 if on_gpu else 100) if act_iters is None else int(act_iters)
    if not adaround:
        iters = 0
    x = _draw_calibration(calib_data, num_samples, seed).to(dev)
    fp = copy.deepcopy(model).to(dev).eval()
    fold_bn(fp, x[:min(8, x.size(0))])
    for prm in fp.parameters():
        prm.requires_grad_(False)
    q = copy.deepcopy(fp)
    quantize_(q, bit_config, act_bits=act_bits, quantize_input=quantize_input,
              weight_init=weight_init, skip=skip)
    set_act_quant(q, False)
    blocks = find_blocks(q, x[:min(8, x.size(0))])
    cap_bs = max(batch_size, 128)
    info: dict[str, Any] = {"blocks": blocks, "block_losses": {}}
    if iters > 0:
        for bi, name in enumerate(_progress(blocks, progress, "PTQ blocks (AdaRound)")):
            qb = q.get_submodule(name) if name else q
            if not _weight_quantizers(qb):
                continue
            tgt = _capture(fp, fp.get_submodule(name) if name else fp, x, cap_bs, want="output")
            inp = _capture(q, qb, x, cap_bs, want="input")
            g = torch.Generator().manual_seed(seed * 1000003 + bi)
            info["block_losses"][name] = _reconstruct_weights(
                qb, inp, tgt, iters=iters, batch_size=batch_size, lr=lr, reg_weight=reg_weight,
                warmup=warmup, beta_range=beta_range, p=p, gen=g, progress=False,
                desc=f"block {name}")
    t1 = time.perf_counter()
    calibrate_activations(q, [x[i:i + cap_bs] for i in range(0, x.size(0), cap_bs)])
    if act_iters > 0:
        for bi, name in enumerate(_progress(blocks, progress, "PTQ blocks (LSQ act)")):
            qb = q.get_submodule(name) if name else q
            tgt = _capture(fp, fp.get_submodule(name) if name else fp, x, cap_bs, want="output")
            inp = _capture(q, qb, x, cap_bs, want="input")
            g = torch.Generator().manual_seed(seed * 1000003 + 7919 + bi)
            _learn_act_scales(qb, inp, tgt, iters=act_iters, batch_size=batch_size, lr=act_lr,
                              p=p, gen=g, progress=False, desc=f"act {name}")
    for prm in q.parameters():
        prm.requires_grad_(False)
    q.eval()
    if stats is not None:
        t2 = time.perf_counter()
        stats.update(info)
        stats.update({"iters": iters, "act_iters": act_iters, "seconds_weights": t1 - t0,
                      "seconds_acts": t2 - t1, "seconds": t2 - t0})
    return q


def _model_device(model: nn.Module) -> torch.device:
    for prm in model.parameters():
        return prm.device
    return torch.device("cpu")
