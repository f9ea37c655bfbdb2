"""`ompq profile`: layer table and ORM of a model from one streaming forward."""
from __future__ import annotations

import argparse
import contextlib
import sys

from ._common import (add_data_arg, add_json_arg, add_model_arg, add_progress_arg,
                      parse_int_list, print_table, resolve_data, resolve_model, write_json_output)


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """Options that define a profile (shared with `ompq allocate --model`)."""
    add_model_arg(parser)
    add_data_arg(parser)
    parser.add_argument("--split", default="train", help="dataset split to sample (default train)")
    parser.add_argument("--num-samples", "-n", type=int, default=64,
                        help="samples N in the forward (≥ 4, default 64)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--include", action="append", default=None, metavar="PAT",
                        help="only layers matching this glob (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, metavar="PAT",
                        help="skip layers matching this glob (repeatable)")
    parser.add_argument("--feature", choices=("auto", "output"), default="auto",
                        help="auto: after a directly following BN/activation; output: raw output")
    parser.add_argument("--debiased", action="store_true", help="unbiased HSIC (U-statistic)")
    parser.add_argument("--device", default=None, help="device for the forward (default: model's)")
    parser.add_argument("--memory-format", choices=("auto", "channels_last", "preserve"),
                        default="auto", help="layout of the input in the forward: auto "
                        "(channels_last for 4-D inputs of conv nets; faster, same ORM), "
                        "channels_last or preserve")
    parser.add_argument("--distortion-bits", default="2,3,4,5,6,7,8", metavar="B,B,...",
                        help="widths of the distortion table the default allocation needs "
                        "(default 2..8; 'none' skips it)")
    parser.add_argument("--distortion-samples", type=int, default=16,
                        help="samples behind the output distortion (default 16)")
    add_progress_arg(parser)


def _distortion_bits(text: str):
    """'2,3,4' -> (2, 3, 4); 'none' -> None."""
    return None if text.strip().lower() == "none" else \
        tuple(parse_int_list(text, "--distortion-bits"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure layers and their orthogonality (ORM)",
                              description="Profile a model: per-layer params, MACs and the ORM "
                              "matrix from one streaming inference forward.")
    add_profile_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def compute_profile(args: argparse.Namespace, model=None, desc=None, data=None):
    """Run `ompq.profile.profile` for parsed profile options (model/data resolved if not given)."""
    from ..profile import profile

    if model is None:
        model, desc = resolve_model(args.model)
    if data is None:
        data = resolve_data(args.data, args.split, seed=args.seed)
    print(f"profiling {desc} on {args.data} ({args.num_samples} samples, seed {args.seed})",
          file=sys.stderr)
    return profile(model, data, num_samples=args.num_samples, seed=args.seed,
                   include=args.include, exclude=args.exclude, feature=args.feature,
                   debiased=args.debiased, device=args.device, progress=args.progress,
                   description=desc, memory_format=args.memory_format,
                   distortion_bits=_distortion_bits(args.distortion_bits),
                   distortion_samples=args.distortion_samples)


def print_profile(prof) -> None:
    """Layer table (γ = mean ORM to the other layers; lower = more orthogonal) and timings."""
    gamma = prof.gamma().tolist()
    rows = [(i, layer.name, layer.kind, layer.params, layer.macs,
             "x".join(str(s) for s in layer.out_shape), round(g, 4))
            for i, (layer, g) in enumerate(zip(prof.layers, gamma))]
    print_table(rows, ["#", "layer", "kind", "params", "MACs", "out", "gamma"])
    total_p = sum(layer.params for layer in prof.layers)
    total_m = sum(layer.macs for layer in prof.layers)
    t = prof.timings
    print(f"\n{len(prof.layers)} layers, {total_p:,} weights ({total_p * 4 / 2**20:.3f} MiB fp32), "
          f"{total_m / 1e6:.2f} MMACs/sample; N = {prof.num_samples}, feature = {prof.feature}"
          f"{', debiased' if prof.debiased else ''}")
    print(f"time: forward {t.get('forward', 0):.3f} s, gram {t.get('gram', 0):.3f} s, "
          f"distortion table {t.get('distortion', 0):.3f} s, orm {t.get('orm', 0):.4f} s, "
          f"total {t.get('total', 0):.3f} s")


def run(args: argparse.Namespace) -> int:
    prof = compute_profile(args)
    with contextlib.redirect_stdout(sys.stderr if args.json == "-" else sys.stdout):
        print_profile(prof)  # keep stdout pure JSON with --json -
    if args.json:
        write_json_output(prof.to_json(), args.json)
    return 0
