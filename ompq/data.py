"""Datasets for ompq: the built-in Fashion-MNIST and ImageNet-style image folders.

No torchvision: Fashion-MNIST is decoded from its idx ``.gz`` files with gzip + numpy, image
folders are read with PIL. Every random choice takes a ``seed`` and uses a local
``torch.Generator``. `sample_inputs` is the one sampler of model inputs (profiling,
calibration); `iter_batches` reads inputs in order, batch by batch.

Dataset specs understood by :func:`load_dataset` (and the CLI's ``--data``):

- ``"fashion-mnist"``: the 28×28×1 Fashion-MNIST split (offline; Debian package
  ``dataset-fashion-mnist`` or the folder in ``$OMPQ_FASHION_MNIST``).
- ``"imagefolder:PATH"``: ImageNet-style class folders (``PATH/<class>/<image>``); if
  ``PATH/<split>`` exists (e.g. ``PATH/val``), that sub-folder is used.
"""
from __future__ import annotations

import functools
import gzip
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .inputs import (Inputs, cat_rows, is_inputs, map_tensors, num_rows, slice_rows,
                     stack_items, take_rows)

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_FASHION_MNIST_ROOT",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "fashion_mnist",
    "ImageFolder",
    "imagefolder",
    "load_dataset",
    "sample_inputs",
    "draw_sample",
    "Sample",
    "split_labels",
    "LabelledRows",
    "labelled_dataset",
    "labelled_batches",
    "iter_batches",
    "draw_indices",
    "make_loader",
]

#: Mean and standard deviation of the Fashion-MNIST training pixels (scaled to [0, 1]).
FASHION_MNIST_MEAN: float = 0.2860
FASHION_MNIST_STD: float = 0.3530
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_VALID_SPECS = "'fashion-mnist' or 'imagefolder:PATH'"


class DatasetError(ValueError):
    """A dataset could not be found, read or parsed; the message says what to change."""


# --------------------------------------------------------------------------- Fashion-MNIST
def _resolve_fmnist_root(root: Optional[Union[str, os.PathLike]]) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("OMPQ_FASHION_MNIST")
    return Path(env) if env else Path(DEFAULT_FASHION_MNIST_ROOT)


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Decode one gzip-compressed idx file (magic 0x08 = uint8) into a numpy array."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read Fashion-MNIST file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if ndim != expected_dims:
        raise DatasetError(f"{path} has {ndim} dimensions, expected {expected_dims}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


@functools.lru_cache(maxsize=8)
def _fmnist_arrays(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded, normalised (images, labels) of one split; cached per (root, split)."""
    img_name, lbl_name, count = _FMNIST_FILES[split]
    base = Path(root)
    missing = [n for n in (img_name, lbl_name) if not (base / n).is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST {split} files not found in {base} (missing: {', '.join(missing)}). "
            "Install them with `apt-get install dataset-fashion-mnist` (files in "
            f"{DEFAULT_FASHION_MNIST_ROOT}) or set OMPQ_FASHION_MNIST to a folder holding "
            f"{img_name} and {lbl_name}.")
    images = _read_idx(base / img_name, 3)
    labels = _read_idx(base / lbl_name, 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"Fashion-MNIST {split} in {base}: {images.shape[0]} images but "
                           f"{labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"Fashion-MNIST {split} in {base}: images are "
                           f"{images.shape[1:]}, expected (28, 28)")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    x = x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze_(1).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def fashion_mnist(split: str = "train",
                  root: Optional[Union[str, os.PathLike]] = None) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of (float32 N×1×28×28, int64 N) tensors.

    Pixels are scaled to [0, 1] and normalised with :data:`FASHION_MNIST_MEAN` /
    :data:`FASHION_MNIST_STD`. ``split`` is ``"train"`` (60 000 images) or ``"test"`` (10 000).
    Files are looked up in ``root``, else ``$OMPQ_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist``. Decoding happens once per process (about 0.5 s);
    later calls share the cached tensors (treat them as read-only).
    """
    if split not in _FMNIST_FILES:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; valid: 'train', 'test'")
    base = _resolve_fmnist_root(root)
    x, y = _fmnist_arrays(str(base.expanduser().resolve()), split)
    return TensorDataset(x, y)


# --------------------------------------------------------------------------- image folders
class ImageFolder(Dataset):
    """ImageNet-style folder ``root/<class>/<image>`` read with PIL.

    Items are ``(image, label)``: image a float32 C×S×S tensor (shorter side resized to
    ``resize`` pixels, centre crop of ``image_size``, scaled to [0, 1], normalised with
    ``mean``/``std``), label the index of the class folder in sorted order (``classes``).
    """

    def __init__(self, root: Union[str, os.PathLike], image_size: int = 224, resize: int = 256,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 grayscale: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a folder; "
                               "expected ImageNet-style class folders PATH/<class>/<image>")
        if image_size <= 0 or resize < image_size:
            raise DatasetError(f"need 0 < image_size <= resize, got image_size={image_size}, "
                               f"resize={resize}")
        channels = 1 if grayscale else 3
        if len(mean) != channels or len(std) != channels:
            raise DatasetError(f"mean/std need {channels} values for "
                               f"{'grayscale' if grayscale else 'RGB'} images, got "
                               f"{len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise DatasetError(f"std values must be positive, got {tuple(std)}")
        self.image_size, self.resize, self.grayscale = int(image_size), int(resize), grayscale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.classes = sorted(d.name for d in self.root.iterdir()
                              if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DatasetError(f"image folder {self.root} has no class sub-folders; expected "
                               "PATH/<class>/<image> (ImageNet layout)")
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            for path in sorted((self.root / cls).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((path, label))
        if not self.samples:
            raise DatasetError(f"image folder {self.root} has class folders "
                               f"{self.classes[:5]} but no images with extensions "
                               f"{', '.join(IMAGE_EXTENSIONS)}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, path: Path) -> torch.Tensor:
        """Read, resize, centre-crop and normalise one image file."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.grayscale else "RGB")
                w, h = img.size
                scale = self.resize / min(w, h)
                new_w, new_h = max(self.resize, round(w * scale)), max(self.resize,
                                                                       round(h * scale))
                if min(w, h) != self.resize:
                    img = img.resize((new_w, new_h), Image.BILINEAR)
                else:
                    new_w, new_h = w, h
                left = (new_w - self.image_size) // 2
                top = (new_h - self.image_size) // 2
                img = img.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(img, dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        t = torch.from_numpy(arr).float().div_(255.0)
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return ((t - self.mean) / self.std).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.load_image(path), label


def imagefolder(path: Union[str, os.PathLike], split: Optional[str] = None,
                image_size: int = 224, resize: int = 256,
                mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, grayscale: bool = False) -> ImageFolder:
    """An :class:`ImageFolder` on ``path`` (or ``path/split`` when that sub-folder exists).

    Standard evaluation transform: shorter side resized to ``resize`` px (bilinear), centre crop
    of ``image_size`` px, scale to [0, 1], normalise with ``mean``/``std`` (ImageNet by default).
    """
    base = Path(path).expanduser()
    if split is not None and (base / split).is_dir():
        base = base / split
    return ImageFolder(base, image_size=image_size, resize=resize, mean=mean, std=std,
                       grayscale=grayscale)


# --------------------------------------------------------------------------- helpers
def load_dataset(spec: str, split: str = "test", **imagefolder_kwargs) -> Dataset:
    """Resolve a dataset spec: ``"fashion-mnist"`` or ``"imagefolder:PATH"``.

    For image folders ``split`` picks ``PATH/<split>`` when that sub-folder exists (``"test"``
    also tries ``val``), else ``PATH`` itself is used; ``imagefolder_kwargs`` (``image_size``,
    ``resize``, ``mean``, ``std``, ``grayscale``) go to :func:`imagefolder`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"dataset spec must be a non-empty string, got {spec!r}; valid: "
                           f"{_VALID_SPECS}")
    name = spec.strip()
    if name.lower() in ("fashion-mnist", "fashion_mnist", "fmnist", "fashionmnist"):
        if imagefolder_kwargs:
            raise DatasetError(f"options {sorted(imagefolder_kwargs)} apply to imagefolder "
                               "specs only, not to fashion-mnist")
        return fashion_mnist(split)
    if name.lower().startswith("imagefolder:"):
        path = name.split(":", 1)[1]
        if not path:
            raise DatasetError("'imagefolder:' needs a path, e.g. imagefolder:/data/imagenet")
        base = Path(path).expanduser()
        sub = split
        if split == "test" and not (base / "test").is_dir() and (base / "val").is_dir():
            sub = "val"
        return imagefolder(base, split=sub, **imagefolder_kwargs)
    raise DatasetError(f"unknown dataset spec {spec!r}; valid: {_VALID_SPECS}")


def _as_entry(v: Any, key: str) -> Any:
    """A dataset item's entry as a tensor (array-likes converted; None/bool pass through)."""
    if isinstance(v, torch.Tensor) or v is None or isinstance(v, bool):
        return v
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"dataset items must hold tensors (or arrays), got {type(v).__name__} "
                        f"for {key}") from err


def _item_input(item: Any) -> Inputs:
    """The inputs of one dataset item or batch: ``x`` itself, or the first element of
    ``(x, y, …)``, where x is a tensor, a dict of tensors or a tuple of tensors (array-likes are
    converted)."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(x, dict):
        return {k: _as_entry(v, repr(k)) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_as_entry(v, f"#{k}") for k, v in enumerate(x))
    return _as_entry(x, "the input")


def draw_indices(count: int, n: int, seed: int) -> torch.Tensor:
    """``min(n, count)`` distinct indices of ``range(count)`` in an order fixed by ``seed``: the
    first ``n`` of a random permutation drawn with a local generator (the global RNG is left
    alone). The one seeded draw behind `sample_inputs`."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(count, generator=gen)[:n]


def _stack_items(dataset: Any, idx: torch.Tensor) -> Inputs:
    """Stack the inputs of ``dataset[i]`` for ``i`` in ``idx`` (a 1-D index tensor, in that
    order; a TensorDataset is indexed directly, and indexing by a 1-D tensor copies, so the
    result never aliases the dataset)."""
    idx = torch.as_tensor(idx)
    if idx.dim() != 1:
        raise ValueError(f"idx must be a 1-D tensor of indices, got shape {tuple(idx.shape)}")
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][idx]
    return stack_items([_item_input(dataset[int(i)]) for i in idx])


def _read_batches(batches: Any, n: int) -> tuple[Optional[Inputs], int]:
    """Concatenate the inputs of an iterable of batches (inputs or ``(x, y)``) until they hold at
    least ``n`` samples; returns the pool (None when there were no batches) and its size."""
    out, have = [], 0
    for batch in batches:
        x = _item_input(batch)
        out.append(x)
        have += num_rows(x, "each batch")
        if have >= n:
            break
    return (cat_rows(out) if out else None), have


_VALID_DATA = ("give at least 1 sample: inputs with N ≥ 1 rows (a tensor, a dict or tuple of "
               "tensors), an (inputs, labels) pair, a non-empty Dataset or an iterable of "
               "non-empty batches")
_VALID_TYPES = ("inputs must be a tensor (N×...), a dict of tensors with N rows (keyword "
                "inputs), an (inputs, labels) pair, a Dataset (items x or (x, y)) or an iterable "
                "of batches")


def split_labels(data: Any) -> tuple[Any, Optional[torch.Tensor]]:
    """``(inputs, labels)`` of an ``(inputs, labels, …)`` pair, ``(data, None)`` for anything
    else. A pair is a tuple/list whose first element is an inputs structure (a tensor, a dict of
    tensors, or a tuple of positional tensors) and whose other elements are tensors."""
    if isinstance(data, (tuple, list)) and data and is_inputs(data[0]) \
            and all(isinstance(v, torch.Tensor) for v in data[1:]) \
            and not (isinstance(data[0], (tuple, list)) and len(data) == 1 and isinstance(data,
                                                                                     list)):
        return data[0], (data[1] if len(data) > 1 else None)
    return data, None


def _kind(data: Any) -> tuple[str, Any]:
    """("rows", inputs), ("dataset", data) or ("batches", data): how `data` is read."""
    inputs, _ = split_labels(data)
    if inputs is not data and isinstance(inputs, (tuple, list)):
        return "rows", inputs  # ((a, b), labels): positional inputs with N rows
    data = inputs
    if isinstance(data, (torch.Tensor, dict)):
        if isinstance(data, dict) and not is_inputs(data):
            raise TypeError(f"{_VALID_TYPES}; got a dict without tensors")
        return "rows", data
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{_VALID_TYPES}, got {type(data).__name__}")
    if isinstance(data, (tuple, list)):
        return "batches", data
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") \
            and not isinstance(data, (DataLoader, IterableDataset)):
        return "dataset", data
    if hasattr(data, "__iter__"):
        return "batches", data
    raise TypeError(f"{_VALID_TYPES}, got {type(data).__name__}")


def _caller_stacklevel() -> int:
    """`warnings.warn` stacklevel, for a warning issued by the function that calls this one, of
    the first frame outside the ompq package: the user's line, however deep inside ompq the
    warning starts."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_globals.get("__name__", "").split(".")[0] == "ompq"
                                 or frame.f_globals.get("__name__") == "contextlib"):
        frame, level = frame.f_back, level + 1  # contextlib: `@stage(...)` decorators
    return level


def _check_count(have: int, num_samples: int, strict: bool, holds: str, empty: str) -> None:
    """Fewer than ``num_samples`` samples: ValueError when `strict` (`holds` says how many the
    data holds), else a UserWarning and all are used (the calibration policy); no sample at
    all raises in both modes (`empty` describes the data)."""
    if have >= num_samples:
        return
    if strict:
        raise ValueError(f"{holds}, fewer than num_samples = {num_samples}")
    if have == 0:
        raise ValueError(f"calibration data is empty ({empty}); {_VALID_DATA}")
    warnings.warn(f"calibration data holds {have} samples, fewer than num_samples = "
                  f"{num_samples}; calibrating on all {have}", UserWarning,
                  stacklevel=_caller_stacklevel())


def _check_num_samples(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {num_samples!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return num_samples


def _draw(count: int, num_samples: int, seed: int, keep_order: bool) -> torch.Tensor:
    idx = draw_indices(count, num_samples, seed)
    return idx.sort().values if keep_order else idx


class Sample:
    """The drawn samples of some data, materialised only on demand (`rows`).

    ``len(sample)`` is the number drawn; ``sample.rows(start, stop)`` stacks samples
    ``start:stop`` into one inputs structure (a tensor, tuple or dict). Tensors, dicts and
    Datasets are read lazily, so a profile over micro-batches holds one micro-batch at a time;
    a stream of batches is read into memory first (it cannot be indexed).
    """

    def __init__(self, source: Any, idx: torch.Tensor, dataset: bool) -> None:
        self.source, self.idx, self.dataset = source, idx, dataset

    def __len__(self) -> int:
        return int(self.idx.numel())

    def rows(self, start: int = 0, stop: Optional[int] = None) -> Inputs:
        """Samples ``start:stop`` (all by default), in the drawn order."""
        part = self.idx[start:stop]
        if self.dataset:
            return _stack_items(self.source, part)
        return take_rows(self.source, part)


def draw_sample(data: Any, num_samples: int, seed: int = 0, *, keep_order: bool = False,
                strict: bool = False) -> Sample:
    """Draw ``num_samples`` samples of ``data`` (see `sample_inputs`) without materialising them."""
    num_samples = _check_num_samples(num_samples)
    kind, src = _kind(data)
    if kind == "rows":
        count = num_rows(src, "inputs")
        what = "tensor" if isinstance(src, torch.Tensor) else "dict of inputs"
        _check_count(count, num_samples, strict, f"the {what} holds {count} samples along dim 0",
                     f"a {what} with 0 rows")
        return Sample(src, _draw(count, num_samples, seed, keep_order), False)
    if kind == "dataset":
        count = len(src)
        _check_count(count, num_samples, strict, f"the dataset holds {count} samples",
                     "a Dataset of length 0")
        return Sample(src, _draw(count, num_samples, seed, keep_order), True)
    pool, have = _read_batches(src, num_samples)
    _check_count(have, num_samples, strict, f"the batches hold {have} samples",
                 "it yielded " + ("no batches" if pool is None else "batches of 0 samples"))
    idx = _draw(have, num_samples, seed, True) if keep_order else \
        torch.arange(min(have, num_samples))
    return Sample(pool, idx, False)


def sample_inputs(data: Any, num_samples: int, seed: int = 0, *, keep_order: bool = False,
                  strict: bool = False) -> Inputs:
    """Draw ``num_samples`` inputs without replacement, seeded by ``seed``.

    ``data``: inputs with N rows (a tensor N × …, a dict of such tensors for keyword inputs);
    an ``(inputs, labels, …)`` pair (the labels are not used; ``((a, b), labels)`` gives
    positional inputs); a map-style Dataset (items ``x`` or ``(x, y, …)``, x any inputs
    structure), sampled through `draw_indices`; or an iterable of batches (inputs or
    ``(x, y)``, e.g. a DataLoader or a list), read until it holds ``num_samples``. The same rows
    are drawn from every entry of a dict or tuple. ``keep_order``: the samples keep their order
    in the data (sorted indices) and a stream's samples are drawn from everything read;
    otherwise they come in draw order and a stream gives its first ``num_samples``. ``strict``:
    too few samples raise ValueError (the profiler's policy); otherwise (the calibration policy)
    they warn, at the first line outside ompq, and are all used, and empty data raises
    ValueError. The global RNG is not used: the same ``seed`` gives the same samples. Returns
    the same structure as the data's inputs, with ``num_samples`` rows.
    """
    return draw_sample(data, num_samples, seed, keep_order=keep_order, strict=strict).rows()


def iter_batches(data: Any, batch_size: int,
                 limit: Optional[int] = None) -> Iterator[Inputs]:
    """Input batches (at most ``batch_size`` samples each) of the first ``limit`` samples (all by
    default), in order, of inputs with N rows, an ``(inputs, labels)`` pair or a map-style
    Dataset. Tensors and TensorDatasets are sliced (views), other Datasets stacked item by item."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    kind, src = _kind(data)
    if kind == "dataset" and isinstance(src, TensorDataset):
        kind, src = "rows", src.tensors[0]
    if kind == "batches":
        raise TypeError(f"iter_batches needs inputs with N rows, an (inputs, labels) pair or a "
                        f"Dataset, got {type(data).__name__}")
    count = num_rows(src) if kind == "rows" else len(src)
    n = count if limit is None else min(limit, count)
    return (_rows(kind, src, i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def _rows(kind: str, src: Any, start: int, stop: int) -> Inputs:
    """Inputs ``start:stop`` of inputs with N rows (views) or a Dataset (stacked)."""
    if kind == "rows":
        return slice_rows(src, start, stop)
    return _stack_items(src, torch.arange(start, stop))


def _check_labels(labels: Any, n: int) -> None:
    """Labels must be a tensor with one row per sample of the inputs (N = n)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] != n:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        raise ValueError(f"labels have shape {shape}; they need one row per sample of the "
                         f"inputs (N = {n})")


class LabelledRows(Dataset):
    """An ``(inputs, labels)`` pair as a Dataset of ``(x, y)`` items, x a tensor, dict or tuple
    of one sample's rows (the DataLoader's default collate batches them back)."""

    def __init__(self, inputs: Inputs, labels: torch.Tensor) -> None:
        _check_labels(labels, num_rows(inputs))
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Inputs, torch.Tensor]:
        return map_tensors(self.inputs, lambda t: t[i]), self.labels[i]


def labelled_dataset(data: Any) -> Dataset:
    """``data`` as a Dataset of ``(x, y)`` items: an ``(inputs, labels)`` pair (inputs of any
    form; a pair of tensors becomes a TensorDataset) or a Dataset, returned as is."""
    inputs, labels = split_labels(data)
    if labels is not None:
        if isinstance(inputs, torch.Tensor):
            _check_labels(labels, num_rows(inputs))
            return TensorDataset(inputs, labels)
        return LabelledRows(inputs, labels)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    raise TypeError("labelled data must be a Dataset of (x, y) items or an (inputs, labels) "
                    f"pair (inputs: a tensor, a dict or a tuple of tensors), got "
                    f"{type(data).__name__}")


def labelled_batches(data: Any, batch_size: int) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """``(inputs, labels)`` batches of at most ``batch_size`` samples, in order, from an
    ``(inputs, labels)`` pair, a Dataset of ``(x, y)`` items or an iterable of such batches."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inputs, labels = split_labels(data)
    if labels is None and isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        inputs, labels = data.tensors[0], data.tensors[1]
    if labels is not None:
        n = num_rows(inputs)
        _check_labels(labels, n)
        for i in range(0, n, batch_size):
            yield slice_rows(inputs, i, i + batch_size), labels[i:i + batch_size]
        return
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("labelled data must yield (inputs, labels) batches, got "
                            f"{type(batch).__name__}")
        yield batch[0], torch.as_tensor(batch[1])


def make_loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, num_workers: int = 0,
                collate_fn: Optional[Callable] = None) -> DataLoader:
    """A ``DataLoader`` whose shuffling uses a local generator seeded with ``seed``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, num_workers=num_workers, collate_fn=collate_fn)
