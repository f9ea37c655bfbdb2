"""`ompq allocate`: per-layer bit-widths under a size and/or BOPs budget (exact ILP)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from .common import (UsageError, add_common_args, add_profile_args, bit_width, bits_list,
                     budget_list, compute_profile, data_spec, pin, print_table, require,
                     resolve_data, resolve_model)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("allocate", help="choose per-layer bits under a budget",
                              description="Allocate weight bits per layer: exact integer optimum "
                              "of an objective (default: the least summed output distortion) under "
                              "--size-mb and/or --bops-g. Give a saved --profile, or a model "
                              "(profiled first).")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="a Profile JSON from `ompq profile --json` (else the model is profiled)")
    add_profile_args(p)
    p.add_argument("--size-mb", type=budget_list, default=None, metavar="S",
                   help="weight size budget in MiB; a comma list gives a Pareto sweep")
    p.add_argument("--bops-g", type=budget_list, default=None, metavar="B",
                   help="BOPs budget in G per sample; a comma list gives a Pareto sweep")
    p.add_argument("--bits", type=bits_list, default=None,
                   help="candidate bits, integers in 2..16 (default 2,3,4,5,6,8; the paper's "
                   "2,3,4 for orm-linear)")
    p.add_argument("--act-bits", type=bit_width, default=8, help="activation bits (default 8)")
    p.add_argument("--pin", type=pin, action="append", default=[], metavar="PAT=BITS",
                   help="fix layers matching PAT to BITS (repeatable), e.g. --pin conv1=8")
    p.add_argument("--tie", action="append", default=[], metavar="A,B,...",
                   help="layers (names/globs) that get equal bits (repeatable)")
    p.add_argument("--beta", type=float, default=None,
                   help="ORM importance temperature of orm/random/orm-linear (default 3)")
    p.add_argument("--method", choices=("ilp", "lp-round"), default="ilp")
    p.add_argument("--proxy", default="error",
                   help="error (default: Σ distortion), orm (ORM-weighted distortion), random "
                   "(shuffled ORM weights), orm-linear (the paper's Σ bits·importance), hawq "
                   "(needs the model and data), uniform")
    p.add_argument("--distortion", choices=("output", "weight"), default="output",
                   help="distortion of error/orm/random: output (layer output noise-to-signal, "
                   "default) or weight (squared weight error)")
    p.add_argument("--time-limit", type=float, default=30.0, help="solver limit in s per budget")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def _print_configs(prof: Any, configs: Sequence[Any]) -> None:
    if len(configs) == 1:
        c = configs[0]
        rows = [(layer.name, layer.kind, layer.params, layer.macs,
                 round(c.importance[layer.name], 4),
                 c.weight_bits[layer.name], c.act_bits[layer.name]) for layer in prof.layers]
        print_table(rows, ["layer", "kind", "params", "MACs", "importance", "w_bits", "a_bits"])
    else:
        rows = [[layer.name, layer.params] + [c.weight_bits[layer.name] for c in configs]
                for layer in prof.layers]
        print_table(rows, ["layer", "params"] + [f"#{k}" for k in range(len(configs))])
    print()
    rows = []
    for k, c in enumerate(configs):
        b = c.budget
        mean = sum(c.weight_bits.values()) / max(len(c.weight_bits), 1)
        rows.append((k, "-" if b.get("size_mb") is None else b["size_mb"], round(c.size_mb, 5),
                     "-" if b.get("bops_g") is None else b["bops_g"], round(c.bops_g, 4),
                     round(mean, 3), c.status, round(c.objective, 4), round(c.search_seconds, 3)))
    print_table(rows, ["#", "budget MiB", "size MiB", "budget GBOPs", "GBOPs", "mean bits",
                       "status", "objective", "seconds"])


def run(args: argparse.Namespace) -> str:
    """Allocate (profiling the model first without --profile; loading it for hawq), print the
    bits per layer and the budgets; the JSON result is the BitConfig (a list for a sweep)."""
    from ..allocate import DEFAULT_BETA, allocate
    from ..bitconfig import save_bit_configs
    from ..profile import Profile

    if args.size_mb is None and args.bops_g is None:
        raise UsageError("give a budget: --size-mb S and/or --bops-g B")
    require("ortools" if args.method == "ilp" else "scipy")
    model = label = data = None
    if args.proxy == "hawq" or not args.profile:
        model, label = resolve_model(args.model)
        data = resolve_data(data_spec(args.data, args.model), args.split, seed=args.seed)
    prof = Profile.from_json(args.profile) if args.profile else \
        compute_profile(args, model, label, data)
    tie = [[t for t in group.split(",") if t] for group in args.tie] or None
    configs = allocate(prof, size_mb=args.size_mb, bops_g=args.bops_g, bits=args.bits,
                       act_bits=args.act_bits, pin=dict(args.pin) or None, tie=tie,
                       beta=DEFAULT_BETA if args.beta is None else args.beta,
                       method=args.method, proxy=args.proxy, model=model, data=data,
                       seed=args.seed, distortion=args.distortion,
                       time_limit_s=args.time_limit, progress=args.progress)
    print(f"allocated {len(prof.layers)} layers of {prof.model} ({args.method}, proxy "
          f"{args.proxy})", file=sys.stderr)
    _print_configs(prof, configs)
    return configs[0].to_json() if len(configs) == 1 else save_bit_configs(configs)
