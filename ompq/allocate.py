"""Bit allocation: the exact integer optimum of an objective under size and BOPs budgets.

`allocate(profile, size_mb=..., bops_g=..., proxy=...)` returns a BitConfig (a list for a
sweep): CP-SAT on integer budgets (bits, BOPs per sample), or the paper's LP relaxation with a
budget-safe rounding (`method="lp-round"`). Formulation: docs/DESIGN.md, "Allocation".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from . import objectives
from .layers import match_pattern
from .objectives import (DEFAULT_BETA, DEFAULT_DISTORTION, DEFAULT_PROXY,  # noqa: F401
                         orm_importance)  # re-exported: ompq.allocate.orm_importance
from .bitconfig import (BITS_PER_MIB, BitConfig, CostModel, check_bits, check_budget,
                        check_width)
from .profile import Profile
from .stages import stage

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
METHODS = ("ilp", "lp-round")
_OBJ_RESOLUTION = 2 ** 31  # integer objective units for the largest value range


class InfeasibleBudgetError(ValueError):
    """No candidate bits meet the budget(s); the message states the achievable size/BOPs range."""


# ----------------------------------------------------------------------------- problem set-up
def _per_layer(spec: Any, names: Sequence[str], default: Any, what: str, conv) -> dict[str, Any]:
    """Expand a value or a dict pattern -> value (later patterns override earlier ones)."""
    if not isinstance(spec, Mapping):
        val = conv(spec, what)
        return {n: val for n in names}
    out = {n: default for n in names}
    for pat, val in spec.items():
        v = conv(val, f"{what}[{pat!r}]")
        for n in match_pattern(pat, names, what):
            out[n] = v
    missing = [n for n, v in out.items() if v is None]
    if missing:
        raise ValueError(f"{what}: no pattern matches layer(s) {missing[:8]}; add a '*' entry")
    return out


def _candidates(names: Sequence[str], bits: Any, pin: Optional[Mapping[str, int]]
                ) -> dict[str, tuple[int, ...]]:
    cand = _per_layer(bits, names, None, "bits", check_bits)
    if pin:
        if not isinstance(pin, Mapping):
            raise TypeError(f"pin must be a dict pattern -> bits, got {type(pin).__name__}")
        pinned: dict[str, int] = {}
        for pat, b in pin.items():
            b = check_width(b, f"pin[{pat!r}]")
            for n in match_pattern(pat, names, "pin"):
                if n in pinned and pinned[n] != b:
                    raise ValueError(f"layer {n!r} is pinned to both {pinned[n]} and {b} bits")
                if b not in cand[n]:
                    raise ValueError(f"pin {pat!r}: {b} bits is not a candidate of layer {n!r} "
                                     f"(candidates {list(cand[n])})")
                pinned[n] = b
        for n, b in pinned.items():
            cand[n] = (b,)
    return cand


def _tie_groups(names: Sequence[str], tie: Any, cand: dict[str, tuple[int, ...]]
                ) -> list[list[int]]:
    """Union of tie groups as lists of layer indices; candidates restricted to the common set."""
    if not tie:
        return []
    if isinstance(tie, (str, bytes)) or not isinstance(tie, Sequence):
        raise TypeError("tie must be a list of groups, each a list of layer names/patterns")
    index = {n: i for i, n in enumerate(names)}
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in tie:
        if isinstance(group, str):
            group = [group]
        members = [index[n] for pat in group for n in match_pattern(pat, names, "tie")]
        for m in members[1:]:
            parent[find(m)] = find(members[0])
    groups: dict[int, list[int]] = {}
    for i in range(len(names)):
        groups.setdefault(find(i), []).append(i)
    out = [g for g in groups.values() if len(g) > 1]
    for g in out:
        common = set(cand[names[g[0]]])
        for i in g[1:]:
            common &= set(cand[names[i]])
        if not common:
            raise ValueError(f"tied layers {[names[i] for i in g]} share no candidate bit-width "
                             f"(candidates {[list(cand[names[i]]) for i in g]})")
        for i in g:
            cand[names[i]] = tuple(sorted(common))
    return out


def _budget_list(value: Any, what: str) -> Optional[list[Optional[float]]]:
    if value is None:
        return None
    vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not vals:
        raise ValueError(f"{what} is an empty list")
    return [check_budget(v, what) for v in vals]


def _budgets(size_mb: Any, bops_g: Any) -> tuple[list[tuple[Optional[float], Optional[float]]],
                                                 bool]:
    sizes, bops = _budget_list(size_mb, "size_mb"), _budget_list(bops_g, "bops_g")
    if sizes is None and bops is None:
        raise ValueError("give a budget: size_mb (MiB of weights) and/or bops_g (GBOPs)")
    sweep = isinstance(size_mb, (list, tuple, np.ndarray)) or \
        isinstance(bops_g, (list, tuple, np.ndarray))
    if sizes is not None and bops is not None and len(sizes) != len(bops):
        if len(sizes) == 1:
            sizes = sizes * len(bops)
        elif len(bops) == 1:
            bops = bops * len(sizes)
        else:
            raise ValueError(f"size_mb has {len(sizes)} budgets and bops_g {len(bops)}; give "
                             "lists of the same length or one scalar")
    count = len(sizes or bops)
    sizes = sizes or [None] * count
    bops = bops or [None] * count
    return list(zip(sizes, bops)), sweep


@dataclass
class _Problem:
    names: list[str]
    cand: dict[str, tuple[int, ...]]
    groups: list[list[int]]
    cost: CostModel
    params: np.ndarray
    macs: np.ndarray
    act: np.ndarray
    values: list[dict[int, float]]
    weights: Optional[np.ndarray] = None  # w_i when values_i[b] = b · w_i for every layer

    def size_bits(self, bits: Sequence[int]) -> int:
        """Σ params_i · b_i (exact integer bits)."""
        return self.cost.size_bits(bits)

    def bops(self, bits: Sequence[int]) -> int:
        """Σ MACs_i · b_i · a_i (exact integer BOPs per sample)."""
        return self.cost.bops(bits, self.act)

    def objective(self, bits: Sequence[int]) -> float:
        return float(sum(v[int(b)] for v, b in zip(self.values, bits)))

    def extreme(self, pick) -> list[int]:
        return [pick(self.cand[n]) for n in self.names]


def _caps(problem: _Problem, size_mb: Optional[float], bops_g: Optional[float]
          ) -> tuple[Optional[int], Optional[int]]:
    """Integer caps (bits, BOPs) of the budgets, checked against the achievable range."""
    cap_size = None if size_mb is None else math.floor(Fraction(size_mb) * BITS_PER_MIB)
    cap_bops = None if bops_g is None else math.floor(Fraction(bops_g) * 10 ** 9)
    lo, hi = problem.extreme(min), problem.extreme(max)
    too_small = (cap_size is not None and problem.size_bits(lo) > cap_size) or \
        (cap_bops is not None and problem.bops(lo) > cap_bops)
    if too_small:
        raise InfeasibleBudgetError(
            f"no bit assignment meets the budget (size_mb={size_mb}, bops_g={bops_g}): under the "
            f"candidates and pins the size ranges from {problem.cost.size_mb(lo):.6g} to "
            f"{problem.cost.size_mb(hi):.6g} MiB and the BOPs from "
            f"{problem.cost.bops_g(lo, problem.act):.6g} to "
            f"{problem.cost.bops_g(hi, problem.act):.6g} G")
    return cap_size, cap_bops


# ----------------------------------------------------------------------------- ILP (CP-SAT)
class _CpSat:
    """One CP-SAT model reused for every budget of a sweep (only the caps change).

    When every layer's values are `b · w_i` (the linear "orm-linear" objective) each layer is
    one integer variable whose domain is its candidate set (about 10× faster to prove optimal);
    otherwise one boolean per (layer, candidate) with exactly one true per layer.
    """

    def __init__(self, problem: _Problem, seed: int, time_limit_s: float) -> None:
        from ortools.sat.python import cp_model

        self.cp_model = cp_model
        self.p = problem
        self.model = cp_model.CpModel()
        self.max_size = problem.size_bits(problem.extreme(max))
        self.max_bops = problem.bops(problem.extreme(max))
        if problem.weights is not None:
            self._build_int()
        else:
            self._build_bool()
        self.solver = cp_model.CpSolver()
        self.solver.parameters.num_workers = 1
        self.solver.parameters.random_seed = int(seed)
        self.solver.parameters.max_time_in_seconds = float(time_limit_s)
        # CP-SAT installs its own SIGINT handler by default and leaves it behind after the
        # solve, so a later Ctrl-C killed the process: keep Python's handler.
        self.solver.parameters.catch_sigint_signal = False

    def _budget_rows(self, terms: list[tuple[Any, int, int, int]]) -> None:
        """terms: (variable, coefficient multiplier, params, act·MACs) per variable term."""
        lin = self.cp_model.LinearExpr
        xs = [t[0] for t in terms]
        self.size_ct = self.model.add(
            lin.weighted_sum(xs, [t[1] * t[2] for t in terms]) <= self.max_size)
        self.bops_ct = self.model.add(
            lin.weighted_sum(xs, [t[1] * t[3] for t in terms]) <= self.max_bops)

    def _build_int(self) -> None:
        p, cp, m = self.p, self.cp_model, self.model
        self.b = [m.new_int_var_from_domain(cp.Domain.from_values(list(p.cand[n])), f"b[{i}]")
                  for i, n in enumerate(p.names)]
        for g in p.groups:
            for i in g[1:]:
                m.add(self.b[i] == self.b[g[0]])
        self._budget_rows([(v, 1, int(p.params[i]), int(p.act[i]) * int(p.macs[i]))
                           for i, v in enumerate(self.b)])
        w = np.asarray(p.weights, dtype=np.float64)
        top = float(np.abs(w).max()) * max(max(c) for c in p.cand.values())
        scale = _OBJ_RESOLUTION / top if top > 0 else 0.0
        m.maximize(cp.LinearExpr.weighted_sum(self.b, [int(round(x * scale)) for x in w]))

    def _build_bool(self) -> None:
        p, cp, m = self.p, self.cp_model, self.model
        self.x: list[dict[int, Any]] = []
        for i, n in enumerate(p.names):
            xs = {b: m.new_bool_var(f"x[{i},{b}]") for b in p.cand[n]}
            m.add_exactly_one(xs.values())
            self.x.append(xs)
        for g in p.groups:
            for i in g[1:]:
                for b in p.cand[p.names[g[0]]]:
                    m.add(self.x[i][b] == self.x[g[0]][b])
        self._budget_rows([(v, b, int(p.params[i]), int(p.act[i]) * int(p.macs[i]))
                           for i, xs in enumerate(self.x) for b, v in xs.items()])
        # per-layer shift to a minimum of 0 (exactly one candidate is chosen), global scale
        span = max(max(v.values()) - min(v.values()) for v in p.values)
        scale = _OBJ_RESOLUTION / span if span > 0 else 0.0
        obj = [(x, int(round((p.values[i][b] - min(p.values[i].values())) * scale)))
               for i, xs in enumerate(self.x) for b, x in xs.items()]
        m.maximize(cp.LinearExpr.weighted_sum([o[0] for o in obj], [o[1] for o in obj]))

    def _bits(self) -> list[int]:
        if self.p.weights is not None:
            return [int(self.solver.value(v)) for v in self.b]
        return [next(b for b, v in xs.items() if self.solver.boolean_value(v)) for xs in self.x]

    def solve(self, cap_size: Optional[int], cap_bops: Optional[int]) -> tuple[list[int], str]:
        size_dom, bops_dom = self.size_ct.proto.linear.domain, self.bops_ct.proto.linear.domain
        size_dom[len(size_dom) - 1] = self.max_size if cap_size is None else min(cap_size,
                                                                                 self.max_size)
        bops_dom[len(bops_dom) - 1] = self.max_bops if cap_bops is None else min(cap_bops,
                                                                                 self.max_bops)
        status = self.solver.solve(self.model)
        name = self.solver.status_name(status)
        if status not in (self.cp_model.OPTIMAL, self.cp_model.FEASIBLE):
            raise RuntimeError(f"CP-SAT found no solution (status {name}); raise time_limit_s")
        return self._bits(), name


# ----------------------------------------------------------------------------- LP + rounding
def _lp_round(problem: _Problem, cap_size: Optional[int], cap_bops: Optional[int]
              ) -> tuple[list[int], str]:
    """Paper-style continuous relaxation (HiGHS LP) rounded to candidates within the budgets."""
    from scipy.optimize import linprog

    names, num = problem.names, len(problem.names)
    lo = np.array(problem.extreme(min), dtype=float)
    hi = np.array(problem.extreme(max), dtype=float)
    # linear objective slope per bit (exact for "orm-linear"; a least-squares slope otherwise)
    slope = np.empty(num)
    for i, v in enumerate(problem.values):
        bs = np.array(sorted(v), dtype=float)
        ys = np.array([v[int(b)] for b in bs])
        slope[i] = np.polyfit(bs, ys, 1)[0] if len(bs) > 1 else 0.0
    a_ub, b_ub = [], []
    if cap_size is not None:
        a_ub.append(problem.params.astype(float))
        b_ub.append(float(cap_size))
    if cap_bops is not None:
        a_ub.append((problem.act * problem.macs).astype(float))
        b_ub.append(float(cap_bops))
    a_eq, b_eq = [], []
    for g in problem.groups:
        for i in g[1:]:
            row = np.zeros(num)
            row[g[0]], row[i] = 1.0, -1.0
            a_eq.append(row)
            b_eq.append(0.0)
    res = linprog(-slope, A_ub=np.array(a_ub) if a_ub else None, b_ub=b_ub or None,
                  A_eq=np.array(a_eq) if a_eq else None, b_eq=b_eq or None,
                  bounds=list(zip(lo, hi)), method="highs")
    cont = res.x if res.status == 0 else lo
    bits = [max([b for b in problem.cand[n] if b <= c + 1e-9] or [min(problem.cand[n])])
            for n, c in zip(names, cont)]
    units = [g for g in problem.groups] + [[i] for i in range(num)
                                           if not any(i in g for g in problem.groups)]
    bits = _repair(problem, bits, units, cap_size, cap_bops)  # LP tolerance could overshoot
    bits = _greedy_raise(problem, bits, units, cap_size, cap_bops)
    return bits, "LP_ROUNDED" if res.status == 0 else "LP_FAILED_ROUNDED"


def _fits(problem: _Problem, bits: Sequence[int], cap_size: Optional[int],
          cap_bops: Optional[int]) -> bool:
    return (cap_size is None or problem.size_bits(bits) <= cap_size) and \
        (cap_bops is None or problem.bops(bits) <= cap_bops)


def _repair(problem: _Problem, bits: list[int], units: list[list[int]],
            cap_size: Optional[int], cap_bops: Optional[int]) -> list[int]:
    """Lower units one candidate step (least objective loss first) until the budgets hold.

    Terminates feasible: the all-minimum assignment meets the budgets (checked by `_caps`).
    """
    while not _fits(problem, bits, cap_size, cap_bops):
        best, best_loss = None, math.inf
        for u in units:
            cands = problem.cand[problem.names[u[0]]]
            down = [b for b in cands if b < bits[u[0]]]
            if not down:
                continue
            loss = sum(problem.values[i][bits[i]] - problem.values[i][down[-1]] for i in u)
            if loss < best_loss:
                best, best_loss = (u, down[-1]), loss
        if best is None:
            break
        for i in best[0]:
            bits[i] = best[1]
    return bits


def _greedy_raise(problem: _Problem, bits: list[int], units: list[list[int]],
                  cap_size: Optional[int], cap_bops: Optional[int]) -> list[int]:
    """Raise one unit (layer or tie group) to its next candidate by best gain per budget cost."""
    size, bops = problem.size_bits(bits), problem.bops(bits)
    while True:
        best, best_ratio = None, 0.0
        for u in units:
            cands = problem.cand[problem.names[u[0]]]
            up = [b for b in cands if b > bits[u[0]]]
            if not up:
                continue
            nb = up[0]
            d_size = sum((nb - bits[i]) * int(problem.params[i]) for i in u)
            d_bops = sum((nb - bits[i]) * int(problem.act[i]) * int(problem.macs[i]) for i in u)
            if (cap_size is not None and size + d_size > cap_size) or \
                    (cap_bops is not None and bops + d_bops > cap_bops):
                continue
            gain = sum(problem.values[i][nb] - problem.values[i][bits[i]] for i in u)
            cost = max(d_size / cap_size if cap_size else 0.0,
                       d_bops / cap_bops if cap_bops else 0.0, 1e-300)
            if gain > 0 and gain / cost > best_ratio:
                best, best_ratio = (u, nb, d_size, d_bops), gain / cost
        if best is None:
            return bits
        u, nb, d_size, d_bops = best
        for i in u:
            bits[i] = nb
        size, bops = size + d_size, bops + d_bops


# ----------------------------------------------------------------------------- values
def _values(profile: Profile, proxy: Any, beta: float, cand: dict[str, tuple[int, ...]],
            model: Any, data: Any, seed: int, distortion: str
            ) -> tuple[str, dict[str, float], list[dict[int, float]], float,
                       Optional[list[list[str]]], Optional[np.ndarray]]:
    """(proxy name, importance, values[i][b], proxy seconds, tie groups the proxy requires,
    linear weights w when values[i][b] = b · w_i)."""
    names = profile.names
    if isinstance(proxy, Mapping) or proxy in objectives.OBJECTIVES:
        obj = objectives.build(proxy, profile, cand, beta=beta, seed=seed, distortion=distortion)
        return obj.name, obj.importance, obj.values, 0.0, None, obj.linear
    from . import proxies  # lazy: optional heavier dependencies

    if isinstance(proxy, proxies.ProxyResult):  # precomputed values of any method
        res, proxy = proxy, str(proxy.info.get("name", "values"))
    elif isinstance(proxy, str):
        res = proxies.proxy_values(proxy, profile, cand, model=model, data=data, seed=seed)
    else:
        raise TypeError(f"proxy must be a name, a dict layer -> importance or a "
                        f"ompq.proxies.ProxyResult, got {proxy!r}")
    values = []
    for n in names:
        if n not in res.values:
            raise ValueError(f"proxy {proxy!r} gave no values for layer {n!r}")
        missing = [b for b in cand[n] if b not in res.values[n]]
        if missing:
            raise ValueError(f"proxy {proxy!r} gave no value for layer {n!r} at {missing} bits")
        row = {int(b): float(res.values[n][b]) for b in cand[n]}
        if not all(math.isfinite(v) for v in row.values()):
            raise ValueError(f"proxy {proxy!r} gave non-finite values for layer {n!r}: {row}")
        values.append(row)
    imp = {n: float(res.importance.get(n, 0.0)) for n in names}
    return proxy, imp, values, float(res.seconds), res.tie, None


def _problem(profile: Profile, bits: Any, act_bits: Any, pin: Any, tie: Any
             ) -> _Problem:
    if not isinstance(profile, Profile):
        raise TypeError(f"allocate needs a Profile (from ompq.profile), got "
                        f"{type(profile).__name__}")
    names = profile.names
    cand = _candidates(names, bits, pin)
    groups = _tie_groups(names, tie, cand)
    act = _per_layer(act_bits, names, 8, "act_bits", check_width)
    cost = CostModel.from_layers(profile.layers)
    return _Problem(names=names, cand=cand, groups=groups, cost=cost,
                    params=np.array(cost.params, dtype=np.int64),
                    macs=np.array(cost.macs, dtype=np.int64),
                    act=np.array([act[n] for n in names], dtype=np.int64), values=[])


def _import_solver(method: str) -> None:
    if method == "ilp":
        from ortools.sat.python import cp_model  # noqa: F401
    else:
        from scipy.optimize import linprog  # noqa: F401


@stage("allocation")
def allocate(profile: Profile, *, size_mb: Any = None, bops_g: Any = None,
             bits: Any = None, act_bits: Any = 8, pin: Optional[Mapping[str, int]] = None,
             tie: Optional[Sequence[Sequence[str]]] = None, beta: float = DEFAULT_BETA,
             method: str = "ilp", proxy: Any = DEFAULT_PROXY, model: Any = None, data: Any = None,
             seed: int = 0, time_limit_s: float = 30.0, progress: bool = False,
             distortion: str = DEFAULT_DISTORTION) -> Union[BitConfig, list[BitConfig]]:
    """Give every layer of `profile` a weight bit-width under the budget(s).

    `size_mb`: MiB of quantized weights; `bops_g`: GBOPs per sample (b_w·b_a·MACs / 1e9); either
    or both, each a number or a list (a Pareto sweep: returns a list of BitConfig, one per
    budget). `bits`: candidate bit-widths, or a dict glob -> candidates (later patterns override
    earlier ones; every layer must be covered); None: (2, 3, 4, 5, 6, 8), or the reference's PTQ
    candidates (2, 3, 4) for "orm-linear" (`objectives.paper_settings` gives its QAT ones). `act_bits`: int, or dict glob -> int (default 8).
    `pin`: dict glob -> bits (must be a candidate). `tie`: groups of names/globs with equal bits.
    `beta`: ORM importance temperature (`ompq.objectives`). `method`: "ilp" (exact, CP-SAT) or
    "lp-round" (the paper's linear relaxation, rounded within budget: meant for "orm-linear"; it
    ignores the diminishing returns of the distortion objectives). `proxy`: the objective (`ompq.objectives`): "error" (default: Σ D_i(b_i)),
    "orm" (ORM-weighted distortion), "random" (shuffled ORM weights, a null control),
    "orm-linear" (the paper's Σ b_i·w_i), a dict layer -> θ, a baseline of
    `ompq.proxies.proxy_values` ("hawq", "uniform"; `model`, `data` are passed on), or a
    `ompq.proxies.ProxyResult` holding any method's values (layer -> {bits: value}, maximised;
    its `info["name"]` labels the BitConfig). `seed` seeds
    "random" and "hawq". `distortion`: the table row the distortion objectives use ("output":
    the layer's output noise-to-signal ratio, or "weight": the weight's squared error).
    Raises InfeasibleBudgetError (with the achievable size/BOPs range) when no assignment fits.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _import_solver(method)  # one-time import cost is not search time
    t0 = time.perf_counter()
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) \
            or not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    budgets, sweep = _budgets(size_mb, bops_g)
    if bits is None:
        bits = objectives.PAPER_BITS["ptq"] if proxy == "orm-linear" else DEFAULT_BITS
    problem = _problem(profile, bits, act_bits, pin, tie)
    caps = [_caps(problem, s, b) for s, b in budgets]
    proxy_name, importance, values, proxy_s, proxy_tie, linear = _values(
        profile, proxy, beta, problem.cand, model, data, seed, distortion)
    if proxy_tie:  # e.g. "uniform": every layer shares one width, as if passed in `tie`
        problem = _problem(profile, bits, act_bits, pin, list(tie or []) + list(proxy_tie))
        caps = [_caps(problem, s, b) for s, b in budgets]
        values = [{b: row[b] for b in problem.cand[n]} for n, row in zip(problem.names, values)]
    problem.values = values
    problem.weights = linear
    solver = _CpSat(problem, seed, time_limit_s) if method == "ilp" else None
    setup_s = time.perf_counter() - t0
    configs = []
    it = budgets
    if progress and len(budgets) > 1:
        from tqdm.auto import tqdm
        it = tqdm(budgets, desc="ompq allocate", unit="budget", leave=False)
    for (s, b), (cap_s, cap_b) in zip(it, caps):
        t1 = time.perf_counter()
        if solver is not None:
            chosen, status = solver.solve(cap_s, cap_b)
        else:
            chosen, status = _lp_round(problem, cap_s, cap_b)
        configs.append(_config(problem, chosen, status, method, proxy_name, importance, s, b,
                               time.perf_counter() - t1 + (setup_s + proxy_s) / len(budgets)))
    return configs if sweep else configs[0]


def _config(problem: _Problem, chosen: list[int], status: str, method: str, proxy: str,
            importance: dict[str, float], size_mb: Optional[float], bops_g: Optional[float],
            seconds: float) -> BitConfig:
    names = problem.names
    return BitConfig(weight_bits={n: int(b) for n, b in zip(names, chosen)},
                     act_bits={n: int(a) for n, a in zip(names, problem.act)},
                     importance=dict(importance),
                     size_mb=problem.cost.size_mb(chosen),
                     bops_g=problem.cost.bops_g(chosen, problem.act), status=status,
                     objective=problem.objective(chosen), method=method, proxy=proxy,
                     budget={"size_mb": size_mb, "bops_g": bops_g}, search_seconds=seconds)
