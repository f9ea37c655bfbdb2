"""Bit allocation (ompq.allocate): exactness vs brute force, budgets, errors, JSON."""
import importlib
import itertools
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

import ompq
from ompq.allocate import InfeasibleBudgetError, allocate, orm_importance
from ompq.bitconfig import (BitConfig, CostModel, as_bit_config, load_bit_configs,
                            save_bit_configs, to_layer_json)
from ompq.distortion import DistortionTable
from ompq.layers import LayerInfo, match_names
from ompq.profile import Profile

MIB = 8 * 2 ** 20


def make_profile(num=5, seed=0):
    rng = np.random.default_rng(seed)
    layers = [LayerInfo(f"layer{i}.conv", "Conv2d", int(rng.integers(2_000, 400_000)),
                        int(rng.integers(10 ** 5, 10 ** 7)), (4,), (4,)) for i in range(num)]
    base = rng.normal(size=(num, 3))
    feats = base @ rng.normal(size=(3, 12)) + 0.8 * rng.normal(size=(num, 12))
    orm = torch.tensor(np.corrcoef(feats) ** 2)
    return Profile(layers, orm, 32, 0, "auto", False, {}, "synthetic",
                   distortion=synthetic_table([layer.name for layer in layers], rng))


def synthetic_table(names, rng, bits=tuple(range(2, 9))):
    """D_i(b) = c_i · 4^-b (a 2-bit step per bit of resolution), the shape measured tables have."""
    table = DistortionTable(bits=bits, samples=8)
    for n in names:
        c_out, c_w = rng.uniform(0.1, 10.0, size=2)
        table.output[n] = [float(c_out * 4.0 ** -b) for b in bits]
        table.weight[n] = [float(c_w * 4.0 ** -b) for b in bits]
    return table


def brute_force(prof, values, cand, act, size_mb=None, bops_g=None, ties=()):
    """All assignments: best objective, its bits, and the runner-up objective."""
    names = prof.names
    p = [layer.params for layer in prof.layers]
    m = [layer.macs for layer in prof.layers]
    best, best_bits, second = -math.inf, None, -math.inf
    for bits in itertools.product(*[cand[n] for n in names]):
        if any(len({bits[i] for i in g}) > 1 for g in ties):
            continue
        if size_mb is not None and sum(b * q for b, q in zip(bits, p)) > size_mb * MIB:
            continue
        if bops_g is not None and sum(b * a * q for b, a, q in zip(bits, act, m)) > bops_g * 1e9:
            continue
        obj = sum(values[i][b] for i, b in enumerate(bits))
        if obj > best:
            best, best_bits, second = obj, bits, best
        elif obj > second:
            second = obj
    return best, best_bits, second


def frac_budget(prof, frac, cand, act):
    """Budgets at `frac` of the way from the smallest to the largest achievable size/BOPs."""
    lo = [min(cand[n]) for n in prof.names]
    hi = [max(cand[n]) for n in prof.names]
    size = [sum(b * layer.params for b, layer in zip(bits, prof.layers)) / MIB for bits in (lo, hi)]
    bops = [sum(b * a * layer.macs for b, a, layer in zip(bits, act, prof.layers)) / 1e9
            for bits in (lo, hi)]
    return size[0] + frac * (size[1] - size[0]), bops[0] + frac * (bops[1] - bops[0])


def check_against_brute(prof, cfg, values, cand, act, size_mb, bops_g, ties=()):
    best, bits, second = brute_force(prof, values, cand, act, size_mb, bops_g, ties)
    assert cfg.objective == pytest.approx(best, rel=1e-9, abs=1e-9)
    if best - second > 1e-6 * abs(best):
        assert tuple(cfg.weight_bits[n] for n in prof.names) == bits
    if size_mb is not None:
        assert cfg.size_mb <= size_mb
    if bops_g is not None:
        assert cfg.bops_g <= bops_g


@pytest.mark.parametrize("frac", [0.15, 0.5, 0.85])
@pytest.mark.parametrize("which", ["size", "bops", "both"])
def test_ilp_equals_brute_force(frac, which):
    prof = make_profile(5, seed=int(frac * 100))
    cand = {n: (2, 3, 4, 5, 6, 8) for n in prof.names}
    act = [8] * 5
    s, b = frac_budget(prof, frac, cand, act)
    s = s if which in ("size", "both") else None
    b = (b * 1.1 if which == "both" else b) if which in ("bops", "both") else None
    cfg = allocate(prof, size_mb=s, bops_g=b, proxy="orm-linear", bits=cand[prof.names[0]])
    w = orm_importance(prof.orm)
    values = [{c: c * w[i] for c in cand[n]} for i, n in enumerate(prof.names)]
    check_against_brute(prof, cfg, values, cand, act, s, b)
    assert cfg.status == "OPTIMAL" and cfg.method == "ilp" and cfg.proxy == "orm-linear"
    assert cfg.importance == {n: pytest.approx(v) for n, v in zip(prof.names, w)}
    # the default objective: minimise the summed output distortion (theta = 1)
    cfg = allocate(prof, size_mb=s, bops_g=b)
    values = [{c: -prof.distortion.output[n][c - 2] for c in cand[n]} for n in prof.names]
    check_against_brute(prof, cfg, values, cand, act, s, b)
    assert cfg.status == "OPTIMAL" and cfg.proxy == "error"


def test_ilp_candidate_sets_pins_ties_act_bits_brute_force():
    prof = make_profile(6, seed=7)
    names = prof.names
    bits = {"*": (2, 4, 8), "layer[12].conv": (3, 4, 5, 6), "layer5.conv": (4, 8)}
    cand = {n: (2, 4, 8) for n in names}
    cand.update({"layer1.conv": (3, 4, 5, 6), "layer2.conv": (3, 4, 5, 6), "layer5.conv": (4, 8)})
    pin = {"layer0.conv": 8}
    act_bits = {"*": 8, "layer3.conv": 4}
    act = [4 if n == "layer3.conv" else 8 for n in names]
    ties = [["layer1.conv", "layer2.conv"], ["layer3.conv", "layer4.conv"]]
    cand_b = dict(cand)
    cand_b["layer0.conv"] = (8,)
    for frac in (0.3, 0.7):
        s, b = frac_budget(prof, frac, cand_b, act)
        for beta in (0.0, 3.0, 20.0):
            cfg = allocate(prof, size_mb=s, bops_g=b * 1.05, bits=bits, pin=pin, tie=ties,
                           act_bits=act_bits, beta=beta, proxy="orm-linear")
            w = orm_importance(prof.orm, beta)
            values = [{c: c * w[i] for c in cand_b[n]} for i, n in enumerate(names)]
            check_against_brute(prof, cfg, values, cand_b, act, s, b * 1.05,
                                ties=[(1, 2), (3, 4)])
            assert cfg.weight_bits["layer0.conv"] == 8
            assert cfg.weight_bits["layer1.conv"] == cfg.weight_bits["layer2.conv"]
            assert cfg.weight_bits["layer3.conv"] == cfg.weight_bits["layer4.conv"]
            assert cfg.act_bits["layer3.conv"] == 4 and cfg.act_bits["layer0.conv"] == 8


def test_custom_importance_and_proxy_values_brute_force(monkeypatch):
    prof = make_profile(5, seed=3)
    cand = {n: (2, 3, 4, 6) for n in prof.names}
    act = [8] * 5
    s, _ = frac_budget(prof, 0.4, cand, act)
    imp = {n: float(v) for n, v in zip(prof.names, [0.3, 2.0, 1.1, 0.7, 1.5])}
    cfg = allocate(prof, size_mb=s, bits=(2, 3, 4, 6), proxy=imp)
    values = [{c: -imp[n] * prof.distortion.output[n][c - 2] for c in cand[n]}
              for n in prof.names]
    check_against_brute(prof, cfg, values, cand, act, s, None)
    assert cfg.proxy == "custom" and cfg.importance == imp

    # a non-linear proxy (values not proportional to bits) goes through the boolean model
    calls = {}

    def proxy_values(proxy, profile, candidates, *, model, data, seed):
        calls.update(proxy=proxy, model=model, seed=seed)
        vals = {n: {b: -((9 - b) ** 2) * (i + 1) * 0.37 for b in candidates[n]}
                for i, n in enumerate(profile.names)}
        return types.SimpleNamespace(values=vals, importance={n: 1.0 for n in profile.names},
                                     seconds=0.01, tie=None)

    real = importlib.import_module("ompq.proxies")  # else ompq.__getattr__ hands undo the fake
    fake = types.ModuleType("ompq.proxies")
    fake.proxy_values = proxy_values
    fake.ProxyResult = real.ProxyResult
    monkeypatch.setitem(sys.modules, "ompq.proxies", fake)
    monkeypatch.setattr(ompq, "proxies", fake, raising=False)
    cfg = allocate(prof, size_mb=s, bits=(2, 3, 4, 6), proxy="hawq", model="M", seed=4)
    assert calls == {"proxy": "hawq", "model": "M", "seed": 4}
    values = [{c: -((9 - c) ** 2) * (i + 1) * 0.37 for c in cand[n]}
              for i, n in enumerate(prof.names)]
    check_against_brute(prof, cfg, values, cand, act, s, None)
    assert cfg.proxy == "hawq"
    # precomputed values of any method (the benchmark-harness path): same optimum
    res = real.ProxyResult(values={n: {c: values[i][c] for c in cand[n]}
                                   for i, n in enumerate(prof.names)},
                           importance={}, seconds=0.0, info={"name": "mine"})
    cfg = allocate(prof, size_mb=s, bits=(2, 3, 4, 6), proxy=res)
    check_against_brute(prof, cfg, values, cand, act, s, None)
    assert cfg.proxy == "mine"
    res.values[prof.names[2]].pop(4)
    with pytest.raises(ValueError, match=r"no value for layer 'layer2.conv' at \[4\] bits"):
        allocate(prof, size_mb=s, bits=(2, 3, 4, 6), proxy=res)


def test_importance_normalisation():
    prof = make_profile(6, seed=1)
    m = prof.orm.numpy()
    gamma = (m.sum(1) - 1) / 5
    ghat = (gamma - gamma.min()) / (gamma.max() - gamma.min())
    theta = np.exp(-2.0 * ghat)
    w = np.array([theta[i:].mean() for i in range(6)])
    assert np.allclose(orm_importance(prof.orm, 2.0), w / w.mean())
    assert np.allclose(orm_importance(prof.orm, 0.0), 1.0)
    assert np.allclose(orm_importance(torch.ones(4, 4, dtype=torch.float64), 5.0), 1.0)
    assert np.allclose(orm_importance(prof.orm * 0.5 + 0.1, 2.0),  # scale-free in γ
                       orm_importance(prof.orm, 2.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budgets_never_exceeded_lp_round_and_ilp(seed):
    prof = make_profile(12, seed=seed)
    cand = {n: (2, 3, 4, 5, 6, 8) for n in prof.names}
    for frac in (0.05, 0.33, 0.61, 0.9):
        s, b = frac_budget(prof, frac, cand, [8] * 12)
        ilp = allocate(prof, size_mb=s, bops_g=b)
        lp = allocate(prof, size_mb=s, bops_g=b, method="lp-round", tie=[prof.names[:2]])
        for cfg in (ilp, lp):
            assert cfg.size_mb <= s and cfg.bops_g <= b
        assert lp.weight_bits[prof.names[0]] == lp.weight_bits[prof.names[1]]
        assert lp.objective <= ilp.objective + 1e-9
        assert lp.method == "lp-round"


def test_exact_budget_is_reachable():
    prof = make_profile(4, seed=5)
    cfg = allocate(prof, size_mb=1.0, bits=(4,))  # generous: 4 bits everywhere
    same = allocate(prof, size_mb=cfg.size_mb, bits=(4,))  # exactly the achieved size
    assert same.weight_bits == cfg.weight_bits


def test_pareto_sweep_matches_single_calls():
    prof = make_profile(8, seed=2)
    cand = {n: (2, 3, 4, 5, 6, 8) for n in prof.names}
    sizes = [frac_budget(prof, f, cand, [8] * 8)[0] for f in (0.2, 0.5, 0.8)]
    sweep = allocate(prof, size_mb=sizes, bops_g=1e6)
    assert isinstance(sweep, list) and len(sweep) == 3
    for s, cfg in zip(sizes, sweep):
        single = allocate(prof, size_mb=s, bops_g=1e6)
        assert cfg.weight_bits == single.weight_bits and cfg.budget["size_mb"] == s
    assert [c.size_mb for c in sweep] == sorted(c.size_mb for c in sweep)
    lp = allocate(prof, size_mb=sizes, method="lp-round")
    assert all(c.size_mb <= s for c, s in zip(lp, sizes))
    assert isinstance(allocate(prof, size_mb=[sizes[0]]), list)


def test_same_seed_same_result():
    prof = make_profile(30, seed=9)
    s, b = frac_budget(prof, 0.4, {n: (2, 3, 4, 5, 6, 8) for n in prof.names}, [8] * 30)
    a = allocate(prof, size_mb=s, bops_g=b, seed=1)
    b = allocate(prof, size_mb=s, bops_g=b, seed=1)
    assert a.weight_bits == b.weight_bits and a.objective == b.objective


def test_infeasible_budget_states_range():
    prof = make_profile(4, seed=0)
    params = sum(layer.params for layer in prof.layers)
    lo, hi = 2 * params / MIB, 8 * params / MIB
    with pytest.raises(InfeasibleBudgetError) as err:
        allocate(prof, size_mb=lo * 0.99)
    msg = str(err.value)
    assert f"{lo:.6g}" in msg and f"{hi:.6g}" in msg and "BOPs" in msg and "MiB" in msg
    with pytest.raises(InfeasibleBudgetError, match="size ranges from"):
        allocate(prof, size_mb=lo * 1.5, pin={"layer0.conv": 8, "layer1.conv": 8,
                                              "layer2.conv": 8, "layer3.conv": 8})
    macs = sum(layer.macs for layer in prof.layers)
    with pytest.raises(InfeasibleBudgetError, match=f"BOPs from {2 * 8 * macs / 1e9:.6g}"):
        allocate(prof, bops_g=macs * 2 * 8 / 1e9 * 0.9)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give a budget"),
    ({"size_mb": -1}, "size_mb: -1 is not a positive finite number"),
    ({"size_mb": float("nan")}, "size_mb: nan is not a positive finite number"),
    ({"bops_g": [1.0, 0]}, "bops_g: 0 is not a positive finite number"),
    ({"bops_g": [1, 2], "size_mb": [1, 2, 3]}, "same length"),
    ({"size_mb": 1, "bits": (0, 4)}, "bits: bit-width 0 is not an integer in 2..16"),
    ({"size_mb": 1, "bits": (4, 32)}, "bits: bit-width 32 is not an integer in 2..16"),
    ({"size_mb": 1, "bits": ()}, "bits: no bit-width given"),
    ({"size_mb": 1, "bits": (4, "x")}, "bits"),
    ({"size_mb": 1, "bits": {"layer0*": (4,)}}, "no pattern matches layer"),
    ({"size_mb": 1, "bits": {"zzz": (4,), "*": (4,)}}, "bits pattern 'zzz' matches no layer"),
    ({"size_mb": 1, "pin": {"layer1.conv": 7}}, "7 bits is not a candidate of layer 'layer1.conv'"),
    ({"size_mb": 1, "pin": {"nothing": 8}}, "pin pattern 'nothing' matches no layer"),
    ({"size_mb": 1, "pin": {"layer1*": 8, "*.conv": 4}}, "pinned to both 8 and 4"),
    ({"size_mb": 1, "tie": [["layer0.conv", "layer1.conv"]],
      "bits": {"*": (4, 8), "layer0.conv": (2, 3)}}, "share no candidate"),
    ({"size_mb": 1, "tie": [["layer0.conv", "ghost"]]}, "tie pattern 'ghost' matches no layer"),
    ({"size_mb": 1, "method": "slsqp"}, "method must be one of"),
    ({"size_mb": 1, "beta": -1.0}, "beta must be a finite number"),
    ({"size_mb": 1, "act_bits": 0}, "act_bits: bit-width 0 is not an integer in 2..16"),
    ({"size_mb": 1, "pin": {"layer0.conv": 1}}, r"pin\['layer0.conv'\]: bit-width 1 is not"),
    ({"size_mb": 1, "proxy": {"layer0.conv": 1.0}}, "missing"),
    ({"size_mb": 1, "proxy": {n: float("nan") for n in make_profile(4).names}}, "finite"),
    ({"size_mb": 1, "proxy": 3}, "proxy must be a name"),
    ({"size_mb": 1, "time_limit_s": 0}, "time_limit_s"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        allocate(make_profile(4), **kwargs)


def test_needs_a_profile():
    with pytest.raises(TypeError, match="needs a Profile"):
        allocate({"layers": []}, size_mb=1)


def test_bitconfig_json_roundtrip(tmp_path):
    prof = make_profile(5)
    cfg = allocate(prof, size_mb=0.5, bops_g=20.0)
    back = BitConfig.from_json(cfg.to_json())
    assert back == cfg
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert BitConfig.from_json(path) == cfg
    sweep = allocate(prof, size_mb=[0.3, 0.5])
    save_bit_configs(sweep, tmp_path / "s.json")
    assert load_bit_configs(tmp_path / "s.json") == sweep
    assert load_bit_configs(path) == [cfg]
    with pytest.raises(ValueError, match="list of BitConfigs"):
        BitConfig.from_json(tmp_path / "s.json")
    data = json.loads(cfg.to_json())
    with pytest.raises(ValueError, match="version 9, newer"):
        BitConfig.from_json(json.dumps({**data, "version": 9}))
    with pytest.raises(ValueError, match="format 'ompq.BitConfig', got format 'ompq.Profile'"):
        BitConfig.from_json(prof.to_json())
    with pytest.raises(ValueError, match="lacks the field 'weight_bits'"):
        BitConfig.from_json(json.dumps({k: v for k, v in data.items() if k != "weight_bits"}))


def test_cost_model_equals_allocate_and_cli():
    """One cost model: allocate's reported size/BOPs, the CLI's FP32 record, uniform baseline
    and imported configs are the same floats as the documented formulas."""
    from ompq.pipeline import fp32_record, uniform_config

    prof = make_profile(6, seed=2)
    cost = CostModel.from_layers(prof.layers)
    params = [layer.params for layer in prof.layers]
    macs = [layer.macs for layer in prof.layers]
    act = {n: (4, 8)[i % 2] for i, n in enumerate(prof.names)}
    sizes = [cost.size_mb_at(avg) for avg in (2.5, 4.0, 6.0)]
    for cfg in allocate(prof, size_mb=sizes, bops_g=cost.bops_g(5, act), act_bits=act):
        bits = [cfg.weight_bits[n] for n in prof.names]
        assert cfg.size_mb == cost.size_mb(cfg.weight_bits) == cost.size_mb(bits)
        assert cfg.size_mb == sum(p * b for p, b in zip(params, bits)) / (8 * 2 ** 20)
        assert cfg.bops_g == cost.bops_g(cfg.weight_bits, cfg.act_bits)
        assert cfg.bops_g == sum(m * b * act[n] for m, b, n in zip(macs, bits, prof.names)) / 1e9
        imported = cost.complete(as_bit_config(to_layer_json(cfg)))  # sizes 0 -> filled
        assert (imported.size_mb, imported.bops_g) == (cfg.size_mb, cfg.bops_g)
    rec = fp32_record(prof, 90.0, {})
    assert rec["size_mb"] == cost.fp32_size_mb() == sum(params) * 32 / (8 * 2 ** 20)
    assert rec["bops_g"] == cost.fp32_bops_g() == sum(macs) * 32 * 32 / 1e9
    uni = uniform_config(prof, size_mb=cost.size_mb(3) * 1.01, bops_g=None, bits=(2, 3, 4),
                         act_bits=8)
    assert set(uni.weight_bits.values()) == {3} and uni.size_mb == cost.size_mb(3)
    assert uni.bops_g == cost.bops_g(3, 8)


def test_match_names_exact_and_glob():
    names = ["a.b", "a.c", "ab"]
    assert match_names("a.*", names) == ["a.b", "a.c"]
    assert match_names("ab", names) == ["ab"]


def test_lp_round_repair_lowers_an_overshooting_rounding():
    alloc = importlib.import_module("ompq.allocate")
    prof = make_profile(6, seed=1)
    problem = alloc._problem(prof, (2, 4, 8), 8, None, None)
    problem.values = alloc._values(prof, "orm", 3.0, problem.cand, None, None, 0, "output")[2]
    cap = problem.size_bits([4] * 6)
    bits = alloc._repair(problem, [8] * 6, [[i] for i in range(6)], cap, None)
    assert problem.size_bits(bits) <= cap and set(bits) <= {2, 4, 8}


def test_uniform_proxy_gives_highest_uniform_width_that_fits():
    prof = make_profile(num=5, seed=3)
    total = sum(layer.params for layer in prof.layers)
    for width in (2, 3, 4, 6):
        budget = (width + 0.5) * total / MIB  # room for `width`, not for the next one up
        cfg = allocate(prof, size_mb=budget, bits=(2, 3, 4, 5, 6, 8), proxy="uniform")
        assert set(cfg.weight_bits.values()) == {width}
        assert cfg.proxy == "uniform" and cfg.size_mb <= budget


@pytest.mark.parametrize("method", ["ilp", "lp-round"])
def test_proxy_tie_narrows_candidates_like_an_explicit_tie(method):
    # "uniform" ties every layer; A and B share only 4 bits, so the tie must narrow the
    # candidates before the budget is checked (it once gave "raise time_limit_s" or an
    # over-budget config)
    layers = [LayerInfo("A", "Conv2d", 1000, 10 ** 5, (4,), (4,)),
              LayerInfo("B", "Conv2d", 3000, 10 ** 5, (4,), (4,))]
    prof = Profile(layers, torch.eye(2, dtype=torch.float64), 32, 0, "auto", False, {}, "two")
    bits = {"A": (2, 4), "B": (4, 8)}
    too_small = (2 * 1000 + 4 * 3000) / MIB  # fits 2/4 bits, not the common 4 bits
    for tie in (None, [["A", "B"]]):
        with pytest.raises(InfeasibleBudgetError, match="size ranges from 0.00190735 to "
                                                        "0.00190735 MiB"):
            allocate(prof, size_mb=too_small, bits=bits, method=method, proxy="uniform", tie=tie)
    bits = {"A": (2, 4, 8), "B": (4, 8, 16)}  # common {4, 8}
    for budget in (4 * 4000 / MIB, 8 * 4000 / MIB):
        implicit = allocate(prof, size_mb=budget, bits=bits, method=method, proxy="uniform")
        explicit = allocate(prof, size_mb=budget, bits=bits, method=method, proxy="uniform",
                            tie=[["A", "B"]])
        assert implicit.weight_bits == explicit.weight_bits
        assert len(set(implicit.weight_bits.values())) == 1
        assert implicit.size_mb <= budget and implicit.status == explicit.status
        assert implicit.objective == explicit.objective
