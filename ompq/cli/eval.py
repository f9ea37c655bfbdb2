"""`ompq eval`: top-1 of a model — FP32, or a bit-packed ompq checkpoint — on a test split."""
from __future__ import annotations

import argparse
import time
from typing import Any

from .quantize import (add_common_args, emit_json, format_table, guard, resolve_data,
                       resolve_model)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="top-1 / loss of a model or a packed checkpoint on a dataset",
        description="Evaluate the FP32 model, or with --packed the quantized model stored by "
                    "`ompq quantize --out` / `ompq.export.save_packed` (loaded into --model's "
                    "architecture).")
    p.add_argument("--model", default="resnet20",
                   help="zoo name, module.path:factory or saved model file (resnet20)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist or imagefolder:PATH")
    p.add_argument("--split", default="test", help="dataset split (test)")
    p.add_argument("--packed", metavar="FILE", help="bit-packed checkpoint (.ompq) to evaluate")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--batch-size", type=int, default=256)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return guard("eval", lambda: _run(args), getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate

    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    data = resolve_data(args.data, args.split)
    model = resolve_model(args.model)
    record: dict[str, Any] = {"command": "eval", "model": args.model, "data": args.data,
                              "split": args.split, "method": "fp32"}
    if args.packed:
        from ..export import load_packed, read_packed_header

        header, _ = read_packed_header(args.packed)
        model = load_packed(args.packed, model)
        cfg = header.get("bit_config") or {}
        record.update(method="packed", packed=args.packed, size_mb=cfg.get("size_mb"),
                      bops_g=cfg.get("bops_g"))
    t = time.perf_counter()
    r = evaluate(model, data, batch_size=args.batch_size, progress=not args.no_progress,
                 max_samples=args.limit)
    record.update(top1=r["top1"], loss=r["loss"], n=r["n"], seconds=time.perf_counter() - t)
    rows = [[record["method"], f"{r['top1']:.2f}", f"{r['loss']:.4f}", str(r["n"]),
             f"{record['seconds']:.1f}"]]
    print(format_table(["model", "top-1 %", "loss", "n", "eval s"], rows))
    emit_json(args.json, record)
    return 0
