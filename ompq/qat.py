"""Quantization-aware training (SPEC §5): `qat(model, bit_config, data, QATConfig(...))`.

BN folded and frozen, LSQ or STE fine-tuning, SGD with momentum and cosine decay, one process or
many under `torchrun` (rank 0 logs and checkpoints), exact resume from `qat_last.pt` written
atomically after every epoch. Details: docs/DESIGN.md ("QAT").
"""
from __future__ import annotations

import copy
import functools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from . import distributed
from ._jsonio import fields_to_json
from .batchnorm import fold_bn
from .checkpoint import save_atomic
from .data import labelled_dataset, sample_inputs
from .inputs import num_rows, slice_rows, to_device
from .trace import call_model, main_output
from .quantize import (QuantScheme, act_quantizers, calibrate_activations, quant_layers,
                       quantize_, weight_quantizer, with_options)
from .quantizers import ActQuantizer, WeightQuantizer
from .stages import stage

CHECKPOINT_NAME = "qat_last.pt"
METHODS = ("lsq", "ste")
CHECKPOINT_VERSION = 2  # 2: quantizers attached by parametrization (state_dict keys changed)


@dataclass(frozen=True)
class QATConfig:
    """Settings of `qat`.

    `epochs`; `lr`: initial learning rate (cosine decay to 0 over all steps); `batch_size`: the
    global batch; `method`: "lsq" or "ste" (`prepare_qat_model`); `momentum`, `weight_decay`:
    SGD (no decay on biases and scales); `checkpoint_dir`: `qat_last.pt` after every epoch
    (rank 0, atomic); `resume`: continue from it; `seed`: calibration sample, data order
    (seed + epoch) and training RNG; `calib_samples`: activation-range calibration samples;
    `max_steps`: stop after this many optimizer steps from epoch 0 (an interruption: the
    partial epoch is not checkpointed); `act_bits`, `quantize_input`, `skip`: as `quantize_`.
    """

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 128
    method: str = "lsq"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    checkpoint_dir: Union[str, os.PathLike, None] = None
    resume: bool = True
    seed: int = 0
    act_bits: Union[int, dict, None] = None
    quantize_input: bool = True
    skip: Union[str, Sequence[str], None] = None
    calib_samples: int = 512
    max_steps: Optional[int] = None
    device: Union[str, torch.device, None] = None
    num_workers: int = 0
    progress: bool = True


@dataclass
class QATResult:
    """What `qat` returns: the trained `model` (eval mode) and its statistics.

    `start_epoch`: first epoch run (> 0 after a resume); `steps`: optimizer steps counted from
    epoch 0; `interrupted`: stopped by `max_steps`; `seconds`: wall time (s); `last_loss`: the
    last step's cross-entropy; `rank`/`world_size`: this process in a distributed run.
    """

    model: nn.Module
    start_epoch: int
    steps: int
    interrupted: bool
    seconds: float
    last_loss: float
    rank: int
    world_size: int

    def stats(self) -> dict[str, Any]:
        """The statistics as a JSON-serialisable dict (everything but the model)."""
        return fields_to_json(self, exclude=("model",))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _bits_of(model: nn.Module) -> dict[str, int]:
    return {n: weight_quantizer(m).bits for n, m in quant_layers(model)}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    scales = {id(q.scale) for q in _quantizers(model)}
    for prm in model.parameters():
        if not prm.requires_grad:
            continue
        is_scale = id(prm) in scales or prm.dim() <= 1
        (no_decay if is_scale else decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def prepare_qat_model(model: nn.Module, bit_config: Any, calib: Any, *,
                      method: str = "lsq", act_bits: Union[int, dict, None] = None,
                      quantize_input: bool = True, skip: Union[str, Sequence[str], None] = None,
                      calib_batch: int = 128) -> nn.Module:
    """Fold BN, quantize (symmetric per-channel weights) and calibrate activations (EMA).

    `method="lsq"`: weight and activation step sizes are learned (LSQ, min-max initialised);
    `method="ste"`: weight scales recomputed from the weights at every step (max|w| /
    (2^(b−1) − 1)) and activation ranges fixed after calibration, straight-through gradients.
    Deterministic: the same inputs give the same model on every process.
    """
    if method not in METHODS:
        raise ValueError(f"qat method {method!r} unknown; valid: {', '.join(METHODS)}")
    fold_bn(model, slice_rows(calib, 0, 8))
    scheme = QuantScheme(weight_init="minmax", weight_symmetric=True,
                         weight_mode="lsq" if method == "lsq" else "nearest", act_mode="fixed",
                         quantize_input=quantize_input)
    quantize_(model, bit_config, scheme, act_bits=act_bits, skip=skip)
    if method == "ste":
        for m in model.modules():
            if isinstance(m, WeightQuantizer):
                m.dynamic = True
    calibrate_activations(model, [slice_rows(calib, i, i + calib_batch)
                                  for i in range(0, num_rows(calib), calib_batch)])
    if method == "lsq":
        for aq in act_quantizers(model):
            aq.set_mode("lsq")
    return model


def _keeps_caller_rng(fn):
    """Run `fn` with its own global RNG streams: the caller's torch (CPU and CUDA), NumPy and
    Python states are restored afterwards, whatever `fn` seeds or a checkpoint restores."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=devices):
                return fn(*args, **kwargs)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return wrapper


@stage("QAT")
@_keeps_caller_rng
def qat(model: nn.Module, bit_config: Any, train_data: Any, config: Optional[QATConfig] = None,
        **options: Any) -> QATResult:
    """Quantization-aware training of a copy of `model` at `bit_config`.

    Args:
        model: full-precision model (not modified).
        bit_config: anything `quantize_` accepts (a BitConfig, a dict layer -> weight bits).
        train_data: Dataset of `(x, y)` or an `(inputs, labels)` pair of tensors.
        config: a `QATConfig`; `**options` override its fields, e.g. `qat(m, cfg, d, epochs=3)`.

    Returns:
        A `QATResult`: `.model` in eval mode and the statistics. The caller's global RNG states
        are restored on return.
    """
    cfg = with_options(config if config is not None else QATConfig(), options)
    return _train(model, bit_config, train_data, cfg)


def _train(model: nn.Module, bit_config: Any, train_data: Any, cfg: QATConfig) -> QATResult:
    epochs, lr, batch_size, method, seed = cfg.epochs, cfg.lr, cfg.batch_size, cfg.method, cfg.seed
    device, progress, max_steps = cfg.device, cfg.progress, cfg.max_steps
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    rank, world, created = distributed.setup()
    if device is None:
        device = (torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
                  if torch.cuda.is_available() else torch.device("cpu"))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    dataset = labelled_dataset(train_data)
    calib = to_device(sample_inputs(dataset, min(cfg.calib_samples, len(dataset)), seed), device)
    net = prepare_qat_model(copy.deepcopy(model).to(device), bit_config, calib, method=method,
                            act_bits=cfg.act_bits, quantize_input=cfg.quantize_input,
                            skip=cfg.skip)
    net.train()
    torch.manual_seed(seed)
    local_bs = max(1, batch_size // world)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=local_bs, sampler=sampler,
                        num_workers=cfg.num_workers)
    steps_per_epoch = len(loader)
    opt = torch.optim.SGD(_param_groups(net, cfg.weight_decay), lr=lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    start_epoch = 0
    ckpt_path = (Path(cfg.checkpoint_dir) / CHECKPOINT_NAME
                 if cfg.checkpoint_dir is not None else None)
    if cfg.resume and ckpt_path is not None and ckpt_path.exists():
        start_epoch = _load_checkpoint(ckpt_path, net, opt, sched, device)
    ddp = nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    step = start_epoch * steps_per_epoch
    last = torch.zeros(())  # the latest step's loss, detached
    interrupted = False
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        it = loader
        if progress and rank == 0:
            from tqdm import tqdm
            it = tqdm(loader, desc=f"QAT epoch {epoch + 1}/{epochs}", leave=False)
        for x, y in it:
            if max_steps is not None and step >= max_steps:
                interrupted = True
                break
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            loss = F.cross_entropy(main_output(call_model(ddp, x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            last = loss.detach()
            opt.step()
            sched.step()
            _clamp_scales(net)
            step += 1
        if interrupted:
            break
        if ckpt_path is not None and rank == 0:
            save_atomic({"format": "ompq.QATCheckpoint", "version": CHECKPOINT_VERSION,
                         "model": net.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": _rng_state(),
                         "epoch": epoch, "sampler_epoch": epoch, "bits": _bits_of(net),
                         "method": method, "epochs": epochs, "seed": seed}, ckpt_path)
        if world > 1:
            dist.barrier()
        if rank == 0 and progress:
            print(f"[ompq.qat] epoch {epoch + 1}/{epochs} loss {float(last):.4f}", flush=True)
    if created:
        dist.destroy_process_group()
    net.eval()
    return QATResult(model=net, start_epoch=start_epoch, steps=step, interrupted=interrupted,
                     seconds=time.perf_counter() - t0, last_loss=float(last), rank=rank,
                     world_size=world)


def _quantizers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]


@torch.no_grad()
def _clamp_scales(net: nn.Module) -> None:
    for q in _quantizers(net):
        if q.scale.requires_grad:
            q.scale.clamp_(min=1e-8)


def _load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                     device: torch.device) -> int:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if ckpt.get("format") != "ompq.QATCheckpoint":
        raise ValueError(f"{path}: not an ompq QAT checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: QAT checkpoint version {ckpt.get('version')} was written by "
                         f"another ompq (this one reads {CHECKPOINT_VERSION}); use another "
                         "checkpoint_dir or resume=False")
    if ckpt["bits"] != _bits_of(net):
        raise ValueError(f"{path}: checkpoint bits {ckpt['bits']} differ from the bit_config "
                         f"{_bits_of(net)}; use another checkpoint_dir or resume=False")
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"]
    rng["torch"] = rng["torch"].cpu()
    _set_rng_state(rng)
    return int(ckpt["epoch"]) + 1
