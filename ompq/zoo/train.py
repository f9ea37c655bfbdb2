"""Train the ompq zoo models on Fashion-MNIST (CPU friendly, resumable).

Usage::

    python -m ompq.zoo.train --model resnet20 --epochs 12 --out ompq/zoo/checkpoints/
    python -m ompq.zoo.train --model resnet20 --epochs 12 --out ompq/zoo/checkpoints/ --resume
    python -m ompq.zoo.train --model vit --epochs 26 --out ompq/zoo/checkpoints/

Recipes (:data:`RECIPES`; options left unset take the architecture's values). The CNNs
(resnet20, mobilenetv2): SGD (momentum 0.9, Nesterov), peak learning rate 0.1, weight decay 5e-4.
The ViT: AdamW (betas 0.9/0.999), peak learning rate 2e-3, weight decay 0.05, label smoothing 0.1.
Weight decay never applies to 1-D parameters (BN/LayerNorm, biases) nor to the names a model's
``no_weight_decay()`` returns (the ViT's cls token and position embedding). All: one-cycle
(default: 15 % warm-up from lr/10, then cosine decay to lr/1000) or cosine learning rate, batch
128, light augmentation on tensors (random 28×28 crop of the 2-px padded image + horizontal
flip), channels_last (for the ViT it only changes the layout of the patch-embedding convolution).
Every epoch the model is evaluated on the test split, and two files are written: the full training
state (model, optimiser, schedule, epoch; in ``--state-dir``) so ``--resume`` continues exactly
where it stopped, and the shipped artefacts ``<out>/<model>_fmnist.pt`` (fp32 state_dict) +
``<out>/<model>_fmnist.json``.
Each epoch draws its shuffling, augmentation and dropout from ``seed`` and the epoch index only,
so an interrupted-then-resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoint import save_atomic, write_text_atomic
from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist
from ..evaluate import evaluate
from . import models as _models

__all__ = ["ARCHITECTURES", "RECIPES", "OPTIMIZERS", "QUICK_TEST", "augment", "train", "main"]

ARCHITECTURES = {"resnet20": _models.resnet20, "mobilenetv2": _models.mobilenetv2,
                 "vit": _models.vit}
OPTIMIZERS = ("sgd", "adamw")
_SGD_RECIPE = {"optimizer": "sgd", "lr": 0.1, "sched": "onecycle", "weight_decay": 5e-4,
               "label_smoothing": 0.0}
#: The default training recipe of each architecture: what `train` (and the CLI) use for every
#: option left at None.
RECIPES: dict[str, dict] = {
    "resnet20": dict(_SGD_RECIPE),
    "mobilenetv2": dict(_SGD_RECIPE),
    "vit": {"optimizer": "adamw", "lr": 2e-3, "sched": "onecycle", "weight_decay": 0.05,
            "label_smoothing": 0.1},
}
QUICK_TEST = 2000  # the quick accuracy check uses the first 2 000 test images
_PAD_VALUE = (0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD  # a black pixel, normalised


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (of the ``pad``-px padded image, per sample) + random horizontal flip.

    ``x``: B×C×H×W normalised images; the padding uses the value of a black pixel.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=_PAD_VALUE)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _test_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 in %, mean cross-entropy, top-1 in % on the first ``QUICK_TEST`` images) of
    ``model`` on the test tensors x, y (`ompq.evaluate.evaluate`, batches of 1 000)."""
    full = evaluate(model, (x, y), batch_size=1000, progress=False)
    quick = evaluate(model, (x, y), batch_size=1000, progress=False, max_samples=QUICK_TEST)
    return full["top1"], full["loss"], quick["top1"]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model: nn.Module, name: str, lr: float, weight_decay: float
               ) -> torch.optim.Optimizer:
    groups = _param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(map(repr, OPTIMIZERS))}")


def _scheduler(opt: torch.optim.Optimizer, sched: str, lr: float, total_steps: int):
    if sched == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total_steps, pct_start=0.15, div_factor=10.0,
            final_div_factor=100.0, anneal_strategy="cos", cycle_momentum=False)
    if sched == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    raise ValueError(f"unknown schedule {sched!r}; valid: 'onecycle', 'cosine'")


def train(model_name: str = "resnet20", epochs: int = 10, out: str | os.PathLike = ".",
          *, lr: Optional[float] = None, sched: Optional[str] = None, batch_size: int = 128,
          weight_decay: Optional[float] = None, seed: int = 0, resume: bool = False,
          limit_train: Optional[int] = None, stop_after: Optional[int] = None,
          state_dir: Optional[str | os.PathLike] = None, threads: int = 2,
          channels_last: bool = True, eval_limit: Optional[int] = None,
          progress: bool = True, command: Optional[str] = None,
          optimizer: Optional[str] = None, label_smoothing: Optional[float] = None) -> dict:
    """Train ``model_name`` on Fashion-MNIST; returns the metadata dict written as JSON.

    ``optimizer`` ("sgd" or "adamw"), ``lr`` (peak), ``sched``, ``weight_decay`` and
    ``label_smoothing`` left at None take the architecture's :data:`RECIPES` values.

    ``stop_after`` ends this run after that many completed epochs in total (to be continued with
    ``resume=True``); ``limit_train`` trains on the first N training images only.
    Times are wall-clock seconds, accumulated over resumed runs.
    """
    from tqdm import tqdm

    if model_name not in ARCHITECTURES:
        raise ValueError(f"unknown model {model_name!r}; valid: {', '.join(ARCHITECTURES)}")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    recipe = RECIPES[model_name]
    optimizer = recipe["optimizer"] if optimizer is None else optimizer
    lr = recipe["lr"] if lr is None else lr
    sched = recipe["sched"] if sched is None else sched
    weight_decay = recipe["weight_decay"] if weight_decay is None else weight_decay
    label_smoothing = recipe["label_smoothing"] if label_smoothing is None else label_smoothing
    torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    st_dir = Path(state_dir) if state_dir is not None else Path("ompq_runs") / "train"
    st_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model_name}_fmnist"
    state_path = st_dir / f"{stem}_state.pt"

    xtr, ytr = fashion_mnist("train").tensors
    xte, yte = fashion_mnist("test").tensors
    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if eval_limit is not None:
        xte, yte = xte[:eval_limit], yte[:eval_limit]
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[model_name]()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, optimizer, lr, weight_decay)
    scheduler = _scheduler(opt, sched, lr, epochs * steps_per_epoch)
    config = {"model": model_name, "epochs": epochs, "lr": lr, "sched": sched,
              "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
              "limit_train": limit_train, "optimizer": optimizer,
              "label_smoothing": label_smoothing}
    start_epoch, seconds, history = 0, 0.0, []
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        # states saved before the optimizer / label-smoothing options were SGD without smoothing
        if {"optimizer": "sgd", "label_smoothing": 0.0, **state["config"]} != config:
            raise ValueError(f"cannot resume from {state_path}: it was made with "
                             f"{state['config']}; pass the same options or drop --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, seconds, history = state["epoch"], state["seconds"], state["history"]
    last_epoch = epochs if stop_after is None else min(epochs, stop_after)
    meta: dict = {}
    for epoch in range(start_epoch, last_epoch):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(xtr), generator=gen)
        model.train()
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{model_name} epoch {epoch + 1}/{epochs}",
                   disable=not progress, file=sys.stderr, leave=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100003 + epoch)  # dropout
            for step in bar:
                idx = order[step * batch_size:(step + 1) * batch_size]
                xb = augment(xtr[idx], gen)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                if label_smoothing:
                    loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=label_smoothing)
                else:
                    loss = F.cross_entropy(model(xb), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                scheduler.step()
                value = float(loss.detach())
                running = 0.9 * running + 0.1 * value if step else value
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
        bar.close()
        seconds += time.perf_counter() - t0
        top1, test_loss, quick = _test_metrics(model, xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": running, "test_top1": top1,
                        "test_loss": test_loss, "seconds": seconds})
        print(f"{model_name} epoch {epoch + 1}/{epochs}: train loss {running:.4f}, "
              f"test top-1 {top1:.2f} %, {seconds:.0f} s", file=sys.stderr, flush=True)
        save_atomic({"config": config, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "seconds": seconds, "history": history}, state_path)
        meta = _write_artifacts(model, out_dir, stem, model_name, epoch + 1, epochs, top1,
                                seconds, history, command, limit_train, eval_limit, len(xte),
                                quick)
    if not meta:  # nothing left to train (already finished): rewrite the artefacts
        top1, _, quick = _test_metrics(model, xte, yte)
        meta = _write_artifacts(model, out_dir, stem, model_name, start_epoch, epochs, top1,
                                seconds, history, command, limit_train, eval_limit, len(xte),
                                quick)
    return meta


def _write_artifacts(model: nn.Module, out_dir: Path, stem: str, name: str, done: int,
                     epochs: int, top1: float, seconds: float, history: list, command,
                     limit_train, eval_limit, n_test: int, quick_top1: float) -> dict:
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_atomic(sd, out_dir / f"{stem}.pt")
    meta = {
        "model": name, "dataset": "fashion-mnist", "test_top1": round(top1, 2),
        "test_samples": n_test,
        f"test_top1_first{QUICK_TEST}": round(quick_top1, 2),  # quick check used by the tests
        "epochs": done, "epochs_planned": epochs,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds, 1), "dtype": "float32",
        "input_shape": [1, 28, 28],
        "normalization": {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD},
        "limit_train": limit_train, "history": history,
        "command": command or f"python -m ompq.zoo.train --model {name} --epochs {epochs}",
        "torch": torch.__version__,
    }
    write_text_atomic(json.dumps(meta, indent=2) + "\n", out_dir / f"{stem}.json")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ompq.zoo.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=sorted(ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "checkpoints"))
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="default: the model's recipe (sgd for the CNNs, adamw for vit)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the model's recipe, 0.1 CNNs / 2e-3 vit)")
    p.add_argument("--sched", default=None, choices=["onecycle", "cosine"],
                   help="default: the model's recipe (onecycle)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--wd", type=float, default=None,
                   help="weight decay (default: the model's recipe, 5e-4 CNNs / 0.05 vit)")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help="default: the model's recipe (0 for the CNNs, 0.1 for vit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the saved state")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N images")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in total (resume later)")
    p.add_argument("--state-dir", default=None, help="where the resumable state goes "
                   "(default ompq_runs/train)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cmd = "python -m ompq.zoo.train " + " ".join(
        shlex.quote(s) for s in (sys.argv[1:] if argv is None else list(argv))
        if s != "--resume")
    meta = train(a.model, a.epochs, a.out, lr=a.lr, sched=a.sched, batch_size=a.batch_size,
                 weight_decay=a.wd, seed=a.seed, resume=a.resume, limit_train=a.limit_train,
                 stop_after=a.stop_after, state_dir=a.state_dir, threads=a.threads,
                 channels_last=not a.no_channels_last, eval_limit=a.eval_limit,
                 progress=not a.no_progress, command=cmd, optimizer=a.optimizer,
                 label_smoothing=a.label_smoothing)
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
