"""Baseline proxies: Hutchinson trace vs the exact Hessian trace, determinism, uniform/random."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ompq.proxies import hessian_traces, proxy_values, quant_perturbation


@dataclass
class _L:
    name: str
    params: int


@dataclass
class _P:
    layers: list


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _xy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 5, generator=g)
    return x, torch.randint(0, 3, (32,), generator=g)


def _exact_trace(model, name, x, y):
    params = dict(model.named_parameters())
    w0 = params[f"{name}.weight"].detach()

    def loss(w):
        p = dict(params, **{f"{name}.weight": w})
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    h = torch.autograd.functional.hessian(loss, w0)
    return float(h.reshape(w0.numel(), w0.numel()).diagonal().sum())


def test_hutchinson_matches_exact_trace():
    m = _tiny()
    x, y = _xy()
    est, used = hessian_traces(m, ["0", "2"], x, y, max_iters=3000, tol=0, seed=0)
    assert used == 3000
    for name in ("0", "2"):
        exact = _exact_trace(m, name, x, y)
        # (the Hessian of a tanh net need not be PSD: traces may be negative)
        assert est[name] == pytest.approx(exact, rel=0.05, abs=0.02)


def _profile(model):
    return _P([_L(n, m.weight.numel()) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)])


def test_hawq_values_deterministic_and_monotone():
    m = _tiny()
    x, y = _xy()
    prof = _profile(m)
    a = proxy_values("hawq", prof, (2, 4, 8), model=m, data=(x, y), seed=1, num_samples=32)
    b = proxy_values("hawq", prof, (2, 4, 8), model=m, data=(x, y), seed=1, num_samples=32)
    assert a.values == b.values and a.importance == b.importance and a.seconds > 0
    for n in ("0", "2"):
        w = m.get_submodule(n).weight.detach()
        pert = [quant_perturbation(w, b) for b in (2, 4, 8)]
        assert pert[0] > pert[1] > pert[2] > 0  # more bits, smaller perturbation
        assert a.values[n][4] == pytest.approx(-a.importance[n] * pert[1])
    # without labels the model's own predictions are used
    c = proxy_values("hawq", prof, (2, 4), model=m, data=x, seed=1, num_samples=32)
    assert set(c.values) == {"0", "2"}


def test_uniform_and_errors():
    m = _tiny()
    prof = _profile(m)
    u = proxy_values("uniform", prof, {"0": (2, 4), "2": (2, 4)})
    assert u.tie == [["0", "2"]]
    assert u.values["0"][4] == pytest.approx(4 * 20 / 32)
    with pytest.raises(ValueError, match="valid: orm, error, random, orm-linear, hawq, uniform"):
        proxy_values("fisher", prof, (2, 3))
    with pytest.raises(ValueError, match="needs model= and data="):
        proxy_values("hawq", prof, (2, 3))
