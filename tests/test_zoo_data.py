"""Tests of ompq.data (Fashion-MNIST, image folders, sampling) and ompq.zoo (models, shipped
checkpoints, resumable training). Budget: well under 45 s on 2 CPU cores."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from ompq import data as D
from ompq import zoo
from ompq.evaluate import evaluate
from ompq.zoo import train as T

EXPECTED_PARAMS = {"resnet20": 272186, "mobilenetv2": 370442, "vit": 456394}

from _helpers import ItemsDataset


# --------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_and_normalisation(split, n):
    ds = D.fashion_mnist(split)
    x, y = ds.tensors
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
    black = (0.0 - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD
    white = (1.0 - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD
    assert float(x.min()) == pytest.approx(black, abs=1e-5)
    assert float(x.max()) == pytest.approx(white, abs=1e-5)
    if split == "train":  # the constants are the training-set statistics
        assert float(x.mean()) == pytest.approx(0.0, abs=0.01)
        assert float(x.std()) == pytest.approx(1.0, abs=0.01)


def test_fashion_mnist_is_cached():
    a, b = D.fashion_mnist("test"), D.fashion_mnist("test")
    assert a.tensors[0].data_ptr() == b.tensors[0].data_ptr()


def test_fashion_mnist_missing_files(tmp_path, monkeypatch):
    with pytest.raises(D.DatasetError, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist("test", root=tmp_path)
    monkeypatch.setenv("OMPQ_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(D.DatasetError, match="OMPQ_FASHION_MNIST"):
        D.fashion_mnist("train")
    with pytest.raises(D.DatasetError, match="valid: 'train', 'test'"):
        D.fashion_mnist("validation")


def test_fashion_mnist_from_root_and_corrupt(tmp_path):
    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in imgs.shape)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + imgs.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 9]))
    x, y = D.fashion_mnist("test", root=tmp_path).tensors
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [1, 2, 9]
    expect = (imgs[1].astype(np.float32) / 255 - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD
    assert np.allclose(x[1, 0].numpy(), expect, atol=1e-6)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + imgs.tobytes()[:100])  # truncated
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 9]))
    with pytest.raises(D.DatasetError, match="truncated"):
        D.fashion_mnist("train", root=tmp_path)


# --------------------------------------------------------------------------- image folders
def _make_folder(root, size=(40, 30)):
    from PIL import Image

    gen = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = gen.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_reads_resizes_and_normalises(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    ds = D.imagefolder(root, image_size=16, resize=20)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    # a plain re-implementation of resize(shorter side 20) + centre crop 16 + normalise
    from PIL import Image

    img = Image.open(root / "dog" / "1.png").convert("RGB").resize((27, 20), Image.BILINEAR)
    arr = np.asarray(img.crop((5, 2, 21, 18)), dtype=np.float32) / 255
    mean, std = np.array(D.IMAGENET_MEAN), np.array(D.IMAGENET_STD)
    ref = ((arr - mean) / std).transpose(2, 0, 1)
    assert np.allclose(x.numpy(), ref, atol=1e-5)
    # split sub-folder and the spec form
    _make_folder(tmp_path / "big" / "val")
    assert len(D.load_dataset(f"imagefolder:{tmp_path / 'big'}", split="test")) == 6
    assert len(D.load_dataset(f"imagefolder:{root}", split="train")) == 6
    small = D.load_dataset(f"imagefolder:{root}", grayscale=True, image_size=28, resize=28,
                           mean=(0.5,), std=(0.5,))
    assert small[0][0].shape == (1, 28, 28)
    assert D.sample_inputs(ds, 3, seed=1, strict=True).shape == (3, 3, 16, 16)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.imagefolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match="no class sub-folders"):
        D.imagefolder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    with pytest.raises(D.DatasetError, match="no images"):
        D.imagefolder(tmp_path / "noimg")
    root = _make_folder(tmp_path / "bad")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    ds = D.imagefolder(root, image_size=16, resize=20)
    idx = [str(p) for p, _ in ds.samples].index(str(root / "cat" / "broken.png"))
    with pytest.raises(D.DatasetError, match="broken.png"):
        ds[idx]


def test_load_dataset_specs(tmp_path):
    assert len(D.load_dataset("fashion-mnist")) == 10000
    assert len(D.load_dataset("fashion-mnist", split="train")) == 60000
    for bad in ("cifar10", "", "imagefolder:"):
        with pytest.raises(D.DatasetError, match="fashion-mnist|imagefolder"):
            D.load_dataset(bad)
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_sample_inputs_and_loader():
    ds = D.fashion_mnist("test")
    a, b = D.sample_inputs(ds, 32, seed=3), D.sample_inputs(ds, 32, seed=3)
    assert a.shape == (32, 1, 28, 28) and torch.equal(a, b)
    assert torch.equal(a, ds.tensors[0][D.draw_indices(len(ds), 32, 3)])
    assert not torch.equal(a, D.sample_inputs(ds, 32, seed=4))
    rows = {tuple(r.flatten().tolist()) for r in D.sample_inputs(ds, 200, seed=0)}
    assert len(rows) == 200  # without replacement
    with pytest.raises(ValueError, match="dataset holds 10000 samples, fewer than num_samples"):
        D.sample_inputs(ds, 10001, strict=True)
    l1 = [y for _, y in D.make_loader(ds, 1000, shuffle=True, seed=5)][0]
    l2 = [y for _, y in D.make_loader(ds, 1000, shuffle=True, seed=5)][0]
    assert torch.equal(l1, l2) and len(l1) == 1000


def test_sample_inputs_same_draw_for_every_container():
    x = torch.arange(40.0).reshape(20, 2)
    idx = D.draw_indices(20, 6, 7)
    for data in (x, (x, torch.zeros(20)), torch.utils.data.TensorDataset(x), ItemsDataset(x)):
        assert torch.equal(D.sample_inputs(data, 6, seed=7), x[idx])
        assert torch.equal(D.sample_inputs(data, 6, seed=7, keep_order=True), x[idx.sort().values])


def test_sample_inputs_from_batches():
    x = torch.arange(40.0).reshape(20, 2)
    batches = [(x[i:i + 8], torch.zeros(8)) for i in range(0, 20, 8)]  # 8 + 8 + 4
    assert torch.equal(D.sample_inputs(iter(batches), 10, seed=1), x[:10])  # first 10, in order
    pool = D.sample_inputs(batches, 10, seed=1, keep_order=True)  # drawn from the 16 read
    assert torch.equal(pool, x[D.draw_indices(16, 10, 1).sort().values])
    with pytest.raises(ValueError, match="the batches hold 20 samples, fewer than"):
        D.sample_inputs(batches, 21, strict=True)


def test_sample_inputs_copies_a_tensor_dataset():
    data = torch.utils.data.TensorDataset(torch.arange(10.0).reshape(5, 2))
    out = D.sample_inputs(data, 2, seed=0)
    out += 100
    assert torch.equal(data.tensors[0], torch.arange(10.0).reshape(5, 2))


def test_sample_inputs_short_data_warns_at_the_callers_line_or_raises():
    with pytest.warns(UserWarning, match="holds 6 samples, fewer than num_samples = 8; "
                                         "calibrating on all 6") as rec:
        x = D.sample_inputs(torch.randn(6, 3), 8)
    assert x.shape == (6, 3) and rec[0].filename == __file__
    with pytest.raises(ValueError, match="the tensor holds 6 samples along dim 0, fewer than "
                                         "num_samples = 8"):
        D.sample_inputs(torch.randn(6, 3), 8, strict=True)
    with pytest.raises(ValueError, match="the tensor holds 0 samples"):
        D.sample_inputs(torch.empty(0, 3), 1, strict=True)


@pytest.mark.parametrize("data, num_samples, error, match", [
    (42, 4, TypeError, "inputs must be a tensor"),
    ({"x": [1, 2]}, 4, TypeError, "a dict without tensors"),
    ({"input_ids": torch.zeros(4, 3), "attention_mask": torch.ones(5, 3)}, 4, ValueError,
     "inconsistent number of samples \\('input_ids' has 4, 'attention_mask' has 5"),
    (torch.randn(4, 2), 0, ValueError, "num_samples must be >= 1"),
    (torch.randn(4, 2), 2.0, TypeError, "num_samples must be an int"),
])
def test_sample_inputs_bad_arguments(data, num_samples, error, match):
    with pytest.raises(error, match=match):
        D.sample_inputs(data, num_samples)


def test_iter_batches_in_order_up_to_the_limit():
    x = torch.arange(40.0).reshape(20, 2)
    for data in (x, (x, torch.zeros(20)), torch.utils.data.TensorDataset(x), ItemsDataset(x)):
        got = list(D.iter_batches(data, 8, limit=18))
        assert [len(b) for b in got] == [8, 8, 2] and torch.equal(torch.cat(got), x[:18])
        assert torch.equal(torch.cat(list(D.iter_batches(data, 64))), x)
    with pytest.raises(TypeError, match="iter_batches needs"):
        list(D.iter_batches(iter([x]), 8))


# --------------------------------------------------------------------------- zoo
def test_zoo_names_and_errors():
    assert zoo.list_models() == ["resnet20", "mobilenetv2", "vit"]
    assert zoo.DEFAULT_MODEL == "resnet20" and zoo.INPUT_SHAPE == (1, 28, 28)
    assert list(T.ARCHITECTURES) == zoo.list_models() and set(T.RECIPES) == set(T.ARCHITECTURES)
    with pytest.raises(zoo.ModelNotFoundError, match="resnet20, mobilenetv2, vit"):
        zoo.load("resnet18")
    with pytest.raises(ValueError, match="valid names"):
        zoo.info("vgg")


def test_zoo_missing_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_CHECKPOINT_DIR", tmp_path)
    with pytest.raises(zoo.CheckpointMissingError, match="retrain"):
        zoo.load("resnet20")
    with pytest.raises(zoo.CheckpointMissingError, match="missing"):
        zoo.info("mobilenetv2")
    assert isinstance(zoo.load("resnet20", pretrained=False), torch.nn.Module)


@pytest.mark.parametrize("name", zoo.list_models())
def test_zoo_model_structure(name):
    m = zoo.create(name)
    assert sum(p.numel() for p in m.parameters()) == EXPECTED_PARAMS[name]
    assert m(torch.randn(2, *zoo.INPUT_SHAPE)).shape == (2, 10)
    mods = list(m.modules())
    acts = [x for x in mods if isinstance(x, (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.GELU))]
    assert acts, "activations must be modules so hooks see them"
    if name == "mobilenetv2":
        assert any(isinstance(x, torch.nn.Conv2d) and x.groups > 1 and x.groups == x.in_channels
                   for x in mods), "MobileNetV2 needs depthwise convolutions"
    assert zoo.create(name, num_classes=7, in_channels=3)(torch.randn(1, 3, 28, 28)).shape == (1, 7)


@pytest.mark.parametrize("name", zoo.list_models())
def test_shipped_checkpoint_accuracy(name):
    meta = zoo.info(name)
    assert meta["model"] == name and meta["dataset"] == "fashion-mnist"
    assert meta["params"] == EXPECTED_PARAMS[name]
    assert zoo.checkpoint_path(name).stat().st_size < 3 * 2**20
    model = zoo.load(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.state_dict().values()
               if p.is_floating_point())
    assert 0 < meta["test_top1"] <= 100 and meta["test_samples"] == 10000
    # the full 10 000-image check costs too much CPU for CI; the checkpoint's JSON also records
    # the accuracy on the first QUICK_TEST test images, which must be reproduced here
    x, y = D.fashion_mnist("test").tensors
    n = T.QUICK_TEST
    top1 = evaluate(model, (x[:n], y[:n]), batch_size=500, progress=False)["top1"]
    assert top1 == pytest.approx(meta[f"test_top1_first{n}"], abs=0.3)


# --------------------------------------------------------------------------- training
def test_augment_is_seeded_crop_and_flip():
    x = torch.randn(8, 1, 28, 28)
    a = T.augment(x, torch.Generator().manual_seed(0))
    b = T.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # every output is a shifted (by ≤ 2 px) and possibly mirrored copy of its input
    for i in range(8):
        ok = False
        for img in (a[i, 0], a[i, 0].flip(-1)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    src = x[i, 0, max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)]
                    dst = img[max(-dy, 0):28 + min(-dy, 0), max(-dx, 0):28 + min(-dx, 0)]
                    ok |= torch.equal(src, dst)
        assert ok


def test_train_resume_equals_uninterrupted(tmp_path):
    kw = dict(limit_train=192, eval_limit=64, progress=False, batch_size=64, threads=1)
    full = T.train("resnet20", 2, tmp_path / "full", state_dir=tmp_path / "s1", **kw)
    part = T.train("resnet20", 2, tmp_path / "part", state_dir=tmp_path / "s2", stop_after=1,
                   **kw)
    assert part["epochs"] == 1
    with pytest.raises(ValueError, match="cannot resume"):
        T.train("resnet20", 3, tmp_path / "part", state_dir=tmp_path / "s2", resume=True, **kw)
    resumed = T.train("resnet20", 2, tmp_path / "part", state_dir=tmp_path / "s2", resume=True,
                      **kw)
    assert resumed["epochs"] == 2 and resumed["test_top1"] == full["test_top1"]
    sa = torch.load(tmp_path / "full" / "resnet20_fmnist.pt", weights_only=True)
    sb = torch.load(tmp_path / "part" / "resnet20_fmnist.pt", weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    meta = json.loads((tmp_path / "part" / "resnet20_fmnist.json").read_text())
    assert meta["epochs"] == 2 and len(meta["history"]) == 2
