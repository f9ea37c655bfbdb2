"""Token transformers with random weights, called Hugging Face style, for tests and benchmarks.

`TokenTransformer(...)(input_ids, attention_mask=None)`: a token and position embedding,
pre-norm blocks (LayerNorm, attention with one fused `qkv` Linear and a `proj` Linear, LayerNorm,
MLP `fc1` → GELU → `fc2`), a final LayerNorm and a head: class logits from the mean of the real
tokens (`num_classes`), or next-token logits (an LM head). The attention mask (1 = token,
0 = padding) masks the keys, so no real token sees a padded one. Shapes of well-known models
(`bert_base`, `gpt2_medium`, …) are factories for `ompq profile --model
ompq.zoo.transformer:bert_base`; `tokens()` draws a padded batch of random token ids for them.
These models are untrained: they exercise the flow and time it, they have no accuracy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TokenTransformer", "tiny_encoder", "tiny_decoder", "bert_base", "gpt2_medium",
           "decoder_1b", "tokens"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if keep is not None:  # (b, t) bool, True = a real token: mask the padded keys
            mask = keep[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=self.causal and mask is None)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TokenTransformer(nn.Module):
    """Encoder (`causal=False`) or decoder (`causal=True`) over token ids; see the module
    docstring. `forward(input_ids, attention_mask=None)`: (N, T) int64 ids and optional (N, T)
    0/1 mask; returns (N, num_classes) logits, or (N, T, vocab) when `num_classes` is None."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 max_len: int = 512, causal: bool = False,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes if num_classes is not None else vocab)
        self.classify = num_classes is not None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"{t} tokens exceed max_len = {self.max_len}")
        keep = None if attention_mask is None else attention_mask.to(torch.bool)
        x = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        if not self.classify:
            return self.head(x)
        if keep is None:
            return self.head(x.mean(dim=1))
        w = keep.unsqueeze(-1).to(x.dtype)
        return self.head((x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0))


def tiny_encoder(num_classes: Optional[int] = 4) -> TokenTransformer:
    """2 blocks, hidden 32: tests."""
    return TokenTransformer(vocab=100, dim=32, depth=2, heads=4, mlp_ratio=2.0, max_len=128,
                            num_classes=num_classes)


def tiny_decoder() -> TokenTransformer:
    """2 causal blocks, hidden 32, an LM head: tests."""
    return TokenTransformer(vocab=100, dim=32, depth=2, heads=4, mlp_ratio=2.0, max_len=128,
                            causal=True)


def bert_base() -> TokenTransformer:
    """BERT-base shape: 12 blocks, hidden 768, 12 heads, MLP 3072, vocab 30 522 (~110 M
    parameters with the head on 2 classes)."""
    return TokenTransformer(vocab=30522, dim=768, depth=12, heads=12, max_len=512, num_classes=2)


def gpt2_medium() -> TokenTransformer:
    """GPT-2-medium shape: 24 causal blocks, hidden 1024, 16 heads, vocab 50 257 (~355 M
    parameters, the LM head untied)."""
    return TokenTransformer(vocab=50257, dim=1024, depth=24, heads=16, max_len=1024, causal=True)


def decoder_1b() -> TokenTransformer:
    """A ~1.2 B-parameter decoder shape: 20 causal blocks, hidden 2048, 16 heads, vocab 50 257
    (1.0 B in the blocks, 0.2 B in the embedding and the untied LM head)."""
    return TokenTransformer(vocab=50257, dim=2048, depth=20, heads=16, max_len=1024,
                            causal=True)


def tokens(n: int = 256, length: int = 128, vocab: int = 100, seed: int = 0,
           min_length: Optional[int] = None) -> dict[str, Tensor]:
    """A padded batch: `input_ids` (n, length) random ids in [1, vocab) and `attention_mask`
    with a random real length per row in [min_length (default length // 2), length], the rest
    padding (id 0, mask 0)."""
    gen = torch.Generator().manual_seed(int(seed))
    low = length // 2 if min_length is None else min_length
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(low, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}
