"""Architectures of the ompq model zoo, sized for 28×28 single-channel input (Fashion-MNIST).

Every net uses activation *modules* (``nn.ReLU`` / ``nn.ReLU6`` / ``nn.GELU``), never functional
calls, so forward hooks (the ORM profiler, activation quantizers) see every activation. In the
two CNNs every convolution is directly followed by its BatchNorm; the ViT has no BatchNorm (pre-norm
LayerNorm blocks) and every projection of it, the fused ``qkv`` included, is an ``nn.Linear``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BasicBlock", "ResNet20", "resnet20", "InvertedResidual", "MobileNetV2",
           "mobilenetv2", "MOBILENETV2_SETTINGS", "Attention", "Mlp", "TransformerBlock",
           "ViT", "vit"]


# --------------------------------------------------------------------------- ResNet-20
class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, then ReLU (option B: 1×1 conv + BN shortcut)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: 3×3 stem, 3 stages × 3 BasicBlocks (16/32/64 ch, strides 1/2/2).

    On 28×28 input the stages run at 28×28, 14×14 and 7×7; global average pool, then Linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = (16, 32, 64), blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, width, stride if b == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 1) -> ResNet20:
    """ResNet-20 (option-B shortcuts) for ``in_channels``×28×28 input; about 0.27 M weights."""
    return ResNet20(num_classes=num_classes, in_channels=in_channels)


# --------------------------------------------------------------------------- MobileNetV2
#: (expansion t, output channels c, repeats n, first stride s) per stage, for 28×28 input.
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 2),   # 28×28 → 14×14 (stride on the depthwise conv)
    (6, 24, 2, 1),   # 14×14
    (6, 32, 3, 2),   # 14×14 → 7×7
    (6, 64, 2, 1),   # 7×7
    (6, 96, 2, 1),   # 7×7
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """Expansion 1×1 conv-BN-ReLU6 → depthwise 3×3 conv-BN-ReLU6 → linear 1×1 conv-BN.

    The residual connection is used when ``stride == 1`` and the channel count is unchanged.
    With ``expand_ratio == 1`` the expansion conv is omitted.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    """MobileNetV2-style net for 28×28 input: stem 3×3 conv (stride 1), inverted residual
    stages (:data:`MOBILENETV2_SETTINGS`), final 1×1 conv, global average pool, dropout, Linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0,
                 settings: Sequence[tuple[int, int, int, int]] = MOBILENETV2_SETTINGS,
                 last_channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(last_channels * max(1.0, width_mult))
        features: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True))]
        inp = stem
        for t, c, n, s in settings:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        features.append(nn.Sequential(nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last),
                                      nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.avgpool(self.features(x)))
        return self.classifier(self.dropout(x))


def mobilenetv2(num_classes: int = 10, in_channels: int = 1,
                width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2-style net for ``in_channels``×28×28 input (width 1.0: 0.37 M weights)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)


# --------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """Multi-head self-attention with ONE fused ``qkv`` projection (``nn.Linear(d, 3d)``) and an
    output projection ``proj`` (``nn.Linear(d, d)``), both plain Linear layers so that the
    quantizers see them (``nn.MultiheadAttention``'s in-projection is not a Linear module).
    The attention itself is ``F.scaled_dot_product_attention`` (no weights)."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)          # each B×heads×N×head_dim
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1`` (d → hidden) → ``nn.GELU`` module → ``fc2`` (hidden → d)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    One tensor in (B×N×d), one tensor out, so PTQ (`ompq.ptq.find_blocks`) reconstructs each
    block as a unit.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer for 28×28 input.

    ``patch_embed``: ``nn.Conv2d`` with kernel = stride = ``patch`` (7: a 4×4 grid of 16 tokens);
    a learned ``cls_token`` and ``pos_embed`` (1 + tokens positions); pre-norm
    :class:`TransformerBlock` s in the ``nn.Sequential`` ``blocks``; a final LayerNorm ``norm``;
    the ``nn.Linear`` ``head`` on the cls token. ``image_size`` must be a multiple of ``patch``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 patch: int = 7, dim: int = 96, depth: int = 6, num_heads: int = 4,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.patch = patch
        self.num_tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_vit(self)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the training recipe keeps out of weight decay (besides 1-D ones)."""
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)      # B×tokens×d (any memory format)
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes: int = 10, in_channels: int = 1, patch: int = 7, dim: int = 96,
        depth: int = 6, num_heads: int = 4, mlp_ratio: float = 2.0) -> ViT:
    """Small ViT for ``in_channels``×28×28 input: 7×7 patches (16 tokens + cls), dim 96, depth 6,
    4 heads, MLP ratio 2; about 0.45 M weights."""
    return ViT(num_classes=num_classes, in_channels=in_channels, patch=patch, dim=dim,
               depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)


def _init_vit(model: ViT) -> None:
    """Truncated-normal (std 0.02) Linear weights, cls token and position embedding; the patch
    embedding like a Linear layer (LeCun-normal fan-in); zero biases, unit LayerNorm."""
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    w = model.patch_embed.weight
    nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)
    nn.init.zeros_(model.patch_embed.bias)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, small-normal Linear (deterministic under the global seed
    set by the caller, e.g. ``torch.manual_seed`` in the training script)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
