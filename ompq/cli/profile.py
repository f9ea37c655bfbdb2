"""`ompq profile`: layer table and ORM of a model from streaming forwards.

Under `torchrun` every process profiles its share of the micro-batches; rank 0 prints and
writes the result, the other ranks stay silent.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any, Optional

import torch.distributed as dist

from .. import distributed

from .common import add_common_args, add_profile_args, compute_profile, print_table


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure layers and their orthogonality (ORM)",
                              description="Profile a model: per-layer params, MACs and the ORM "
                              "matrix from one streaming inference forward.")
    add_profile_args(p)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> Optional[str]:
    """Profile, print the layer table (γ = mean ORM to the other layers; lower = more
    orthogonal) and the timings; the JSON result is the Profile (None on ranks > 0)."""
    rank, _, created = distributed.setup()
    try:
        if rank != 0:
            args.progress = False
            with contextlib.redirect_stdout(io.StringIO()):
                compute_profile(args)
            return None
        return _report(compute_profile(args))
    finally:
        if created:
            dist.destroy_process_group()


def _report(prof: Any) -> str:
    """Print the layer table and the timings; the Profile's JSON."""
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
          f"{', debiased' if prof.debiased else ''}, micro-batches of {prof.batch_size}"
          f"{f' over {prof.processes} processes' if prof.processes > 1 else ''}")
    comm = f"all-reduce {t['comm']:.4f} s, " if "comm" in t else ""
    print(f"time: forward {t.get('forward', 0):.3f} s, gram {t.get('gram', 0):.3f} s, "
          f"distortion table {t.get('distortion', 0):.3f} s, orm {t.get('orm', 0):.4f} s, "
          f"{comm}total {t.get('total', 0):.3f} s")
    return prof.to_json()
