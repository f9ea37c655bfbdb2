"""`ompq eval`: top-1 of a model — FP32, or a bit-packed ompq checkpoint — on a test split."""
from __future__ import annotations

import argparse
import time
from typing import Any

from .common import (add_common_args, add_data_arg, add_model_arg, data_spec, positive_int,
                     print_table, resolve_data, resolve_model)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="top-1 / loss of a model or a packed checkpoint on a dataset",
        description="Evaluate the FP32 model, or with --packed the quantized model stored by "
                    "`ompq quantize --out` / `ompq.packed.save_packed` (loaded into --model's "
                    "architecture).")
    add_model_arg(p, " (with --packed: the architecture)")
    add_data_arg(p)
    p.add_argument("--split", default="test", help="dataset split (test)")
    p.add_argument("--packed", metavar="FILE", help="bit-packed checkpoint (.ompq) to evaluate")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate the first N samples only")
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate and print one row (top-1 %, loss, n, seconds); the JSON result is that record
    (with the packed BitConfig's size MiB and GBOPs)."""
    from ..evaluate import evaluate

    data_name = data_spec(args.data, args.model)
    data = resolve_data(data_name, args.split, seed=args.seed)
    model, _ = resolve_model(args.model)
    record: dict[str, Any] = {"command": "eval", "model": args.model, "data": data_name,
                              "split": args.split, "method": "fp32"}
    if args.packed:
        from ..packed import load_packed, read_packed_header

        header, _ = read_packed_header(args.packed)
        model = load_packed(args.packed, model)
        cfg = header.get("bit_config") or {}
        record.update(method="packed", packed=args.packed, size_mb=cfg.get("size_mb"),
                      bops_g=cfg.get("bops_g"))
    t = time.perf_counter()
    r = evaluate(model, data, batch_size=args.batch_size, progress=args.progress,
                 max_samples=args.limit)
    record.update(top1=r["top1"], loss=r["loss"], n=r["n"], seconds=time.perf_counter() - t)
    print_table([[record["method"], f"{r['top1']:.2f}", f"{r['loss']:.4f}", r["n"],
                  f"{record['seconds']:.1f}"]], ["model", "top-1 %", "loss", "n", "eval s"])
    return record
