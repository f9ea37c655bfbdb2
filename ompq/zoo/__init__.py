"""The ompq model zoo: two small CNNs and a small ViT trained on Fashion-MNIST, shipped with
the package.

>>> from ompq import zoo
>>> zoo.list_models()
['resnet20', 'mobilenetv2', 'vit']
>>> model = zoo.load("resnet20")          # eval mode, FP32 weights from the shipped checkpoint
>>> zoo.info("resnet20")["test_top1"]     # FP32 top-1 (%) on the 10 000 Fashion-MNIST test images

Inputs are ``INPUT_SHAPE`` = 1×28×28 tensors normalised as :func:`ompq.data.fashion_mnist`
returns them. Retrain with ``python -m ompq.zoo.train --model NAME --epochs E``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .models import mobilenetv2, resnet20, vit

__all__ = ["DEFAULT_MODEL", "INPUT_SHAPE", "NUM_CLASSES", "DATASET", "ModelNotFoundError",
           "CheckpointMissingError", "list_models", "create", "load", "info",
           "checkpoint_path"]

DEFAULT_MODEL = "resnet20"
INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)
NUM_CLASSES = 10
DATASET = "fashion-mnist"

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "mobilenetv2": mobilenetv2,
    "vit": vit,
}
_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


class ModelNotFoundError(ValueError):
    """An unknown zoo model name; the message lists the valid names."""


class CheckpointMissingError(FileNotFoundError):
    """A zoo model's shipped checkpoint (or its metadata) is missing or unreadable."""


def list_models() -> list[str]:
    """Names of the zoo models, default first: ``["resnet20", "mobilenetv2", "vit"]``."""
    return list(_FACTORIES)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _FACTORIES:
        raise ModelNotFoundError(f"unknown zoo model {name!r}; valid names: "
                                 f"{', '.join(_FACTORIES)}")
    return name.lower()


def checkpoint_path(name: str) -> Path:
    """Path of the shipped FP32 checkpoint ``<name>_fmnist.pt`` (it may not exist)."""
    return _CHECKPOINT_DIR / f"{_check_name(name)}_{_short(DATASET)}.pt"


def _short(dataset: str) -> str:
    return "fmnist" if dataset == "fashion-mnist" else dataset


def create(name: str = DEFAULT_MODEL, **kwargs: Any) -> nn.Module:
    """An untrained (randomly initialised, train mode) zoo model; kwargs go to its factory
    (``num_classes``, ``in_channels``, for mobilenetv2 ``width_mult``, for vit ``patch``, ``dim``,
    ``depth``, ``num_heads``, ``mlp_ratio``)."""
    return _FACTORIES[_check_name(name)](**kwargs)


def info(name: str = DEFAULT_MODEL) -> dict:
    """Metadata of the shipped checkpoint: ``model``, ``dataset``, ``test_top1`` (%),
    ``params`` (int), ``epochs``, ``seconds`` (training wall time), ``command``, ..."""
    path = checkpoint_path(name).with_suffix(".json")
    if not path.is_file():
        raise CheckpointMissingError(
            f"metadata {path} of zoo model {name!r} is missing; reinstall ompq or retrain with "
            f"`python -m ompq.zoo.train --model {name} --out {path.parent}`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointMissingError(f"cannot read metadata {path}: {exc}") from exc
    meta.setdefault("size_bytes", checkpoint_path(name).stat().st_size
                    if checkpoint_path(name).is_file() else None)
    return meta


def load(name: str = DEFAULT_MODEL, pretrained: bool = True) -> nn.Module:
    """A zoo model in eval mode, FP32, with the shipped Fashion-MNIST weights
    (``pretrained=False``: random initialisation)."""
    model = create(name)
    if pretrained:
        path = checkpoint_path(name)
        if not path.is_file():
            raise CheckpointMissingError(
                f"checkpoint {path} of zoo model {name!r} is missing; reinstall ompq (the "
                "checkpoints are package data) or retrain with "
                f"`python -m ompq.zoo.train --model {name} --out {path.parent}`")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt file, wrong format, ...
            raise CheckpointMissingError(f"cannot read checkpoint {path}: {exc}") from exc
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)
    return model.eval()
