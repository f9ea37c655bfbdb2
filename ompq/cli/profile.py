"""`ompq profile`: layer table and ORM of a model from one streaming forward."""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_common_args, add_profile_args, compute_profile, print_table


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure layers and their orthogonality (ORM)",
                              description="Profile a model: per-layer params, MACs and the ORM "
                              "matrix from one streaming inference forward.")
    add_profile_args(p)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> str:
    """Profile, print the layer table (γ = mean ORM to the other layers; lower = more
    orthogonal) and the timings; the JSON result is the Profile."""
    prof = compute_profile(args)
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
    return prof.to_json()
