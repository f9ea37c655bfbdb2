"""Orthogonality metric (ORM): linear-kernel CKA between the features of every pair of layers.

From centred Grams in one matrix product, with the biased or the debiased (U-statistic) HSIC.
Definitions and degenerate features: docs/DESIGN.md, "ORM".
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import ops

MIN_SAMPLES = 4
# A feature counts as constant when its total centred variance (trace of the centred Gram) is at
# most this fraction of its raw energy Σ_n ‖x_n‖² (`scales`): fp32 centring of a constant leaves
# rounding noise of relative size ~1e-7, i.e. a ratio ~1e-14. Without `scales`, a Gram whose
# Frobenius norm is below `_ZERO_REL` times the largest one counts as zero.
_CONST_REL = 1e-10
_ZERO_REL = 1e-12


def _layer_name(names: Optional[Sequence[str]], i: int) -> str:
    return repr(names[i]) if names is not None and i < len(names) else f"#{i}"


def flatten_samples(x: Tensor) -> Tensor:
    """x (N×…) as N×D, without a copy when x is channels_last (NCHW or NCDHW).

    The columns then come in (H, W, C) rather than (C, H, W) order; centred Grams, and so the
    ORM, do not depend on the order of the columns.
    """
    n = x.shape[0]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(n, -1)
    if x.dim() == 5 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.permute(0, 2, 3, 4, 1).reshape(n, -1)
    return x.reshape(n, -1)


def feature_gram(x: Tensor) -> Tensor:
    """Centred N×N Gram of one feature (N×…, flattened per sample).

    float64 features are centred and multiplied in float64 (exact reference path); other dtypes
    go through the compiled `ompq.ops.centered_gram` (fp32 result, fp32 accumulation).
    """
    flat = flatten_samples(x)
    if flat.dtype == torch.float64:
        xc = flat - flat.mean(dim=0, keepdim=True)
        return xc @ xc.T
    if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        flat = flat.float()
    return ops.centered_gram(flat)


def u_center(grams: Tensor) -> Tensor:
    """U-centre a batch of Grams (…×N×N): zero diagonal, Székely–Rizzo double centring.

    U_ij = K_ij − r_i/(N−2) − r_j/(N−2) + s/((N−1)(N−2)) for i ≠ j and U_ii = 0, where K has a
    zeroed diagonal, r are its row sums and s its total sum.
    """
    n = grams.shape[-1]
    if n < MIN_SAMPLES:
        raise ValueError(f"the debiased estimator needs at least {MIN_SAMPLES} samples, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=grams.device)
    k = grams.masked_fill(eye, 0.0)
    rows = k.sum(dim=-1)
    total = rows.sum(dim=-1, keepdim=True)
    means = rows / (n - 2) - total / (2 * (n - 1) * (n - 2))
    u = k - means.unsqueeze(-1) - means.unsqueeze(-2)
    return u.masked_fill(eye, 0.0)


class HSICAccumulator:
    """L×L HSIC estimates summed over micro-batches, and the ORM (CKA) they give.

    Each `add` takes the L centred m×m Grams of one micro-batch and adds w·⟨K̃_i, K̃_j⟩ for
    every pair of layers: with `debiased`, K̃ is the U-centred Gram and w = 1/(m(m−3)) (the
    unbiased HSIC of Song et al., 2012), otherwise K̃ is the centred Gram and w = 1/(m−1)².
    `orm()` normalises the sums, CKA_ij = Σ_b HSIC_b(i, j) / √(Σ_b HSIC_b(i, i)·Σ_b HSIC_b(j, j)):
    the minibatch CKA of Nguyen, Raghu & Kornblith (2021). One micro-batch of all N samples is
    the full-batch ORM. Memory: O(L·m² + L²), whatever the number of batches. `state()` /
    `load_state()` expose the sums as one float64 vector, for an all-reduce across processes.
    Estimator and variance: docs/DESIGN.md, "ORM".
    """

    def __init__(self, debiased: bool, names: Optional[Sequence[str]] = None) -> None:
        self.debiased, self.names = bool(debiased), names
        self.hsic: Optional[Tensor] = None   # L×L float64
        self.trace: Optional[Tensor] = None  # L: Σ traces of the centred Grams
        self.energy: Optional[Tensor] = None  # L: Σ raw energies Σ_n ‖x_n‖² (or NaN: unknown)
        self.samples = 0

    def add(self, grams: Tensor, energy: Optional[Tensor] = None) -> None:
        """Add one micro-batch: `grams` L×m×m centred Grams (any float dtype), `energy` (length
        L, optional) each feature's raw energy, for the constant-feature test."""
        _check_grams(grams)
        num, m = grams.shape[0], grams.shape[1]
        if self.hsic is not None and self.hsic.shape[0] != num:
            raise ValueError(f"got {num} Grams after batches of {self.hsic.shape[0]}")
        g = grams.to(torch.float64)
        finite = torch.isfinite(g).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise ValueError(f"layer {_layer_name(self.names, bad)} has a non-finite feature "
                             "(inf/NaN, or values too large for a float32 Gram); check the model "
                             "and its inputs")
        trace = g.diagonal(dim1=1, dim2=2).sum(dim=1)
        if self.debiased:
            g, weight = u_center(g), 1.0 / (m * (m - 3)) if m > 3 else 1.0
        else:
            weight = 1.0 / (m - 1) ** 2
        flat = g.reshape(num, m * m)
        e = torch.full((num,), float("nan"), dtype=torch.float64, device=g.device) \
            if energy is None else \
            torch.as_tensor(energy, dtype=torch.float64, device=g.device).reshape(num)
        parts = (flat @ flat.T * weight, trace, e)
        if self.hsic is None:
            self.hsic, self.trace, self.energy = parts
        else:
            self.hsic += parts[0].to(self.hsic.device)
            self.trace += parts[1].to(self.hsic.device)
            self.energy += parts[2].to(self.hsic.device)
        self.samples += m

    def state(self) -> Tensor:
        """The sums as one float64 vector [hsic (L²), trace (L), energy (L), samples]."""
        if self.hsic is None:
            raise ValueError("no micro-batch was added")
        return torch.cat([self.hsic.flatten(), self.trace, self.energy,
                          torch.tensor([float(self.samples)], dtype=torch.float64,
                                       device=self.hsic.device)])

    def load_state(self, state: Tensor) -> None:
        """Replace the sums by `state` (e.g. all-reduced over processes)."""
        num = self.hsic.shape[0]
        state = state.to(self.hsic.device, torch.float64)
        self.hsic = state[:num * num].reshape(num, num).clone()
        self.trace = state[num * num:num * num + num].clone()
        self.energy = state[num * num + num:num * num + 2 * num].clone()
        self.samples = int(round(float(state[-1])))

    def orm(self) -> Tensor:
        """The L×L float64 ORM: normalised sums, constant features set to 0 (with a warning),
        diagonal 1, clamped to [0, 1] for the biased estimator."""
        if self.hsic is None:
            raise ValueError("no micro-batch was added")
        h = 0.5 * (self.hsic + self.hsic.T)
        norms = h.diagonal().clamp(min=0.0).sqrt()
        if not bool(torch.isnan(self.energy).any()):
            zero = (norms == 0) | (self.trace <= _CONST_REL * self.energy)
        else:
            top = float(norms.max())
            zero = norms <= _ZERO_REL * top if top > 0 else torch.ones_like(norms, dtype=torch.bool)
        for i in zero.nonzero().flatten().tolist():
            warnings.warn(f"layer {_layer_name(self.names, i)} has a constant feature over the "
                          "samples (zero centred Gram); its ORM to every other layer is set to 0",
                          RuntimeWarning, stacklevel=3)
        safe = torch.where(zero, torch.ones_like(norms), norms)
        orm = h / (safe.unsqueeze(1) * safe.unsqueeze(0))
        orm = 0.5 * (orm + orm.T)
        orm[zero] = 0.0
        orm[:, zero] = 0.0
        orm.fill_diagonal_(1.0)
        if not self.debiased:
            orm.clamp_(0.0, 1.0)
        return orm


def _check_grams(grams: Tensor) -> None:
    if not isinstance(grams, Tensor) or grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        shape = tuple(grams.shape) if isinstance(grams, Tensor) else type(grams).__name__
        raise ValueError(f"grams must be an L×N×N tensor, got {shape}")
    if grams.shape[0] == 0:
        raise ValueError("orm_from_grams needs at least one Gram")
    if grams.shape[1] < MIN_SAMPLES:
        raise ValueError(f"ORM needs at least {MIN_SAMPLES} samples, got N = {grams.shape[1]}")


def orm_from_grams(grams: Tensor, debiased: bool = False,
                   names: Optional[Sequence[str]] = None,
                   scales: Optional[Tensor] = None) -> Tensor:
    """L×L float64 ORM from stacked centred Grams (L×N×N, any float dtype).

    One L×N² @ N²×L product of the (U-)centred Grams (`HSICAccumulator` with one batch).
    `names` only improves messages. `scales` (optional, length L): each feature's raw energy
    Σ_n ‖x_n‖² (or an estimate), used to detect constant features robustly (see `_CONST_REL`).
    """
    acc = HSICAccumulator(debiased, names)
    acc.add(grams, scales)
    return acc.orm()


def orm_matrix(features: Sequence[Tensor], debiased: bool = False,
               names: Optional[Sequence[str]] = None) -> Tensor:
    """L×L float64 ORM (linear CKA) of a list of features, each N×… (flattened per sample).

    Every feature must have the same N ≥ 4 along dim 0. `names` (one per feature) only improves
    messages. See the module docstring for the definition and degenerate cases.
    """
    feats = list(features)
    if not feats:
        raise ValueError("orm_matrix needs at least one feature")
    if names is not None and len(names) != len(feats):
        raise ValueError(f"got {len(names)} names for {len(feats)} features")
    n = None
    for i, f in enumerate(feats):
        if not isinstance(f, Tensor):
            raise TypeError(f"feature {_layer_name(names, i)} must be a tensor, got "
                            f"{type(f).__name__}")
        if f.dim() < 1 or (n is not None and f.shape[0] != n):
            raise ValueError(f"feature {_layer_name(names, i)} has shape {tuple(f.shape)}; every "
                             f"feature needs the same number of samples N = {n} on dim 0")
        n = f.shape[0]
        if not f.is_floating_point():
            feats[i] = f.float()
    if n < MIN_SAMPLES:
        raise ValueError(f"ORM needs at least {MIN_SAMPLES} samples, got N = {n}")
    for i, f in enumerate(feats):
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"feature {_layer_name(names, i)} has non-finite values (inf/NaN)")
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in feats) else torch.float32
    grams = torch.stack([feature_gram(f).to(dtype) for f in feats])
    energy = torch.stack([f.double().square().sum() for f in feats])
    return orm_from_grams(grams, debiased=debiased, names=names, scales=energy)


def orm_gamma(orm) -> Tensor:
    """γ_i = mean over j ≠ i of ORM(i, j): how much layer i shares with the others (lower = more
    orthogonal); float64, length L, 0 for a single layer.

    `orm`: an L×L tensor or array. Computed in NumPy (row sums in its pairwise order), the
    arithmetic behind every ORM-based allocation (`objectives.orm_importance`).
    """
    m = np.asarray(orm.detach().cpu().numpy() if isinstance(orm, Tensor) else orm,
                   dtype=np.float64)
    num = m.shape[0]
    return torch.from_numpy((m.sum(axis=1) - np.diag(m)) / max(num - 1, 1))
