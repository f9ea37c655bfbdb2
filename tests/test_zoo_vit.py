"""The zoo ViT (ompq.zoo "vit"): its structure (plain Linear projections, a fused qkv, one PTQ
block per transformer block), the shipped checkpoint's accuracy, 8-bit PTQ close to FP32, and
its AdamW training recipe (resumable). Budget: about 10 s on 2 CPU cores."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ompq import zoo
from ompq.data import fashion_mnist
from ompq.evaluate import evaluate
from ompq.layers import find_layers
from ompq.ptq import find_blocks, ptq
from ompq.quantize import quant_layers
from ompq.zoo import train as T
from ompq.zoo.models import TransformerBlock

N_TEST = 2000  # = T.QUICK_TEST: the JSON records the top-1 on these first test images


@functools.lru_cache(maxsize=1)
def _setup():
    model = zoo.load("vit")
    x, y = fashion_mnist("test").tensors
    sub = (x[:N_TEST], y[:N_TEST])
    fp = evaluate(model, sub, batch_size=500, progress=False)["top1"]
    return model, sub, fp


def _layer_names(model: nn.Module) -> list[str]:
    per_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    return (["patch_embed"] + [f"blocks.{i}.{n}" for i in range(len(model.blocks))
                               for n in per_block] + ["head"])


def test_vit_structure():
    m = zoo.create("vit")
    assert zoo.list_models()[-1] == "vit" and zoo.DEFAULT_MODEL == "resnet20"
    assert sum(p.numel() for p in m.parameters()) == zoo.info("vit")["params"]
    pe = m.patch_embed
    assert isinstance(pe, nn.Conv2d) and pe.kernel_size == pe.stride == (m.patch, m.patch)
    assert isinstance(m.blocks, nn.Sequential) and len(m.blocks) >= 4
    assert isinstance(m.norm, nn.LayerNorm) and isinstance(m.head, nn.Linear)
    assert m.pos_embed.shape[1] == 1 + (28 // m.patch) ** 2 and m.cls_token.shape[:2] == (1, 1)
    d = pe.out_channels
    for blk in m.blocks:
        assert isinstance(blk, TransformerBlock)
        assert isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)
        assert (blk.attn.qkv.in_features, blk.attn.qkv.out_features) == (d, 3 * d)
        assert (blk.attn.proj.in_features, blk.attn.proj.out_features) == (d, d)
        assert isinstance(blk.mlp.act, nn.GELU)
    assert not any(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    assert m(torch.randn(2, *zoo.INPUT_SHAPE)).shape == (2, 10)


def test_vit_channels_last_is_harmless():
    m = zoo.create("vit").eval()
    x = torch.randn(4, *zoo.INPUT_SHAPE)
    with torch.no_grad():
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shipped_vit_reaches_its_recorded_accuracy():
    model, _, fp = _setup()
    meta = zoo.info("vit")
    assert meta["model"] == "vit" and meta["test_samples"] == 10000
    assert not model.training
    assert fp == pytest.approx(meta[f"test_top1_first{N_TEST}"], abs=0.5)


def test_vit_layers_and_ptq_blocks():
    model, (x, _), _ = _setup()
    names = [n for n, _ in find_layers(model)]
    assert names == _layer_names(model)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == len(names) - 1
    blocks = find_blocks(model, x[:4])
    assert blocks == ["patch_embed"] + [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]


def test_vit_8bit_ptq_within_half_a_point_of_fp32():
    model, sub, fp = _setup()
    names = [n for n, _ in find_layers(model)]
    train = fashion_mnist("train")
    res = ptq(model, {n: 8 for n in names}, train, num_samples=256, iters=0, act_iters=0,
              progress=False)
    assert [n for n, _ in quant_layers(res.model)] == names
    top1 = evaluate(res.model, sub, batch_size=500, progress=False)["top1"]
    assert abs(top1 - fp) <= 0.5, (top1, fp)


def test_vit_recipe_is_adamw_and_resumable(tmp_path):
    assert T.RECIPES["vit"]["optimizer"] == "adamw"
    assert T.RECIPES["resnet20"] == T.RECIPES["mobilenetv2"] == {
        "optimizer": "sgd", "lr": 0.1, "sched": "onecycle", "weight_decay": 5e-4,
        "label_smoothing": 0.0}
    kw = dict(limit_train=128, eval_limit=64, progress=False, batch_size=64, threads=1)
    full = T.train("vit", 2, tmp_path / "full", state_dir=tmp_path / "s1", **kw)
    T.train("vit", 2, tmp_path / "part", state_dir=tmp_path / "s2", stop_after=1, **kw)
    state = torch.load(tmp_path / "s2" / "vit_fmnist_state.pt", weights_only=False)
    assert state["config"]["optimizer"] == "adamw"
    assert state["config"]["lr"] == T.RECIPES["vit"]["lr"]
    assert "exp_avg" in next(iter(state["optimizer"]["state"].values()))  # Adam moments
    with pytest.raises(ValueError, match="cannot resume"):
        T.train("vit", 2, tmp_path / "part", state_dir=tmp_path / "s2", resume=True,
                optimizer="sgd", **kw)
    resumed = T.train("vit", 2, tmp_path / "part", state_dir=tmp_path / "s2", resume=True, **kw)
    assert resumed["epochs"] == 2 and resumed["test_top1"] == full["test_top1"]
    sa = torch.load(tmp_path / "full" / "vit_fmnist.pt", weights_only=True)
    sb = torch.load(tmp_path / "part" / "vit_fmnist.pt", weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(full) == set(zoo.info("resnet20")) - {"size_bytes"}  # same metadata format
