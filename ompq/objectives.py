"""Allocation objectives built from a profile alone (`build`), and the ORM importance.

The distortion objectives ("error", "orm", "random", a dict layer -> θ) minimise Σ θ_i·D_i(b_i);
"orm-linear" is the paper's Σ b_i·w_i. Formulas: docs/DESIGN.md, "Objectives".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .distortion import KINDS
from .orm import orm_gamma

DEFAULT_BETA = 3.0
DEFAULT_PROXY = "error"
DEFAULT_DISTORTION = "output"
OBJECTIVES = ("orm", "error", "random", "orm-linear")
#: The reference code's candidate widths and pins (SPEC §4): PTQ 2–4 bits; QAT 4–8 bits with the
#: first and last layers at 8.
PAPER_BITS = {"ptq": (2, 3, 4), "qat": (4, 5, 6, 7, 8)}


def paper_settings(profile: Any, mode: str = "ptq") -> dict[str, Any]:
    """The reference's `allocate` arguments for the paper's objective: candidates {2, 3, 4} for
    PTQ; {4, …, 8} for QAT with the first and last layers (execution order) pinned at 8."""
    if mode not in PAPER_BITS:
        raise ValueError(f"mode must be one of {tuple(PAPER_BITS)}, got {mode!r}")
    out: dict[str, Any] = {"proxy": "orm-linear", "bits": PAPER_BITS[mode]}
    if mode == "qat":
        out["pin"] = {profile.names[0]: 8, profile.names[-1]: 8}
    return out


@dataclass
class Objective:
    """values[i][b] (maximised), importance per layer, and `linear` weights when values = b·w."""

    name: str
    values: list[dict[int, float]]
    importance: dict[str, float]
    linear: Optional[np.ndarray] = None


def check_beta(beta: Any) -> float:
    """β as a float; ValueError unless it is a finite number ≥ 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
            or beta < 0:
        raise ValueError(f"beta must be a finite number ≥ 0, got {beta!r}")
    return float(beta)


def orm_importance(orm: Any, beta: float = DEFAULT_BETA) -> np.ndarray:
    """Per-layer importance (mean 1) from an L×L ORM; see the module docstring."""
    beta = check_beta(beta)
    m = np.asarray(orm.cpu().numpy() if hasattr(orm, "cpu") else orm, dtype=np.float64)
    num = m.shape[0]
    if m.shape != (num, num) or num == 0:
        raise ValueError(f"ORM must be a non-empty square matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("ORM has non-finite entries")
    gamma = orm_gamma(m).numpy()
    span = gamma.max() - gamma.min()
    ghat = (gamma - gamma.min()) / span if span > 1e-12 else np.zeros(num)
    theta = np.exp(-float(beta) * ghat)
    w = np.cumsum(theta[::-1])[::-1] / np.arange(num, 0, -1)
    return w / w.mean()


def custom_importance(spec: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    """Check a dict layer -> θ (every layer exactly once, finite numbers ≥ 0)."""
    unknown = [k for k in spec if k not in set(names)]
    missing = [n for n in names if n not in spec]
    if unknown or missing:
        raise ValueError(f"custom importance must name every layer exactly: unknown "
                         f"{unknown[:8]}, missing {missing[:8]}")
    out = {}
    for n in names:
        v = spec[n]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not math.isfinite(v) or v < 0:
            raise ValueError(f"custom importance of layer {n!r} must be a finite number ≥ 0, "
                             f"got {v!r}")
        out[n] = float(v)
    return out


def _theta(name: str, profile: Any, beta: float, seed: int) -> np.ndarray:
    names = profile.names
    if name == "error":
        return np.ones(len(names))
    w = orm_importance(profile.orm, beta)
    if name == "random":
        return w[np.random.default_rng(seed).permutation(len(names))]
    return w


def build(proxy: Any, profile: Any, cand: Mapping[str, Sequence[int]], *, beta: float,
          seed: int, distortion: str = DEFAULT_DISTORTION) -> Objective:
    """The objective `proxy` ("orm", "error", "random", "orm-linear" or a dict layer -> θ) over
    the candidate widths `cand` (layer -> widths)."""
    names = profile.names
    check_beta(beta)
    if proxy == "orm-linear":
        w = orm_importance(profile.orm, beta)
        imp = {n: float(v) for n, v in zip(names, w)}
        return Objective("orm-linear", [{b: b * imp[n] for b in cand[n]} for n in names], imp,
                         linear=np.asarray(w, dtype=np.float64))
    if distortion not in KINDS:
        raise ValueError(f"distortion must be one of {KINDS}, got {distortion!r}")
    if isinstance(proxy, Mapping):
        imp = custom_importance(proxy, names)
        label = "custom"
    elif proxy in ("orm", "error", "random"):
        imp = {n: float(v) for n, v in zip(names, _theta(proxy, profile, beta, seed))}
        label = proxy
    else:
        raise ValueError(f"objective {proxy!r} unknown; valid: {', '.join(OBJECTIVES)}")
    table = getattr(profile, "distortion", None)
    if table is None:
        raise ValueError(f"proxy {label!r} needs the profile's distortion table, which this "
                         "profile lacks (a version-1 profile or distortion_bits=None); "
                         "re-profile with ompq.profile(...) or `ompq profile`")
    values = []
    for n in names:
        d = table.values(distortion, n, cand[n])
        values.append({b: -imp[n] * v for b, v in d.items()})
    return Objective(label, values, imp)
