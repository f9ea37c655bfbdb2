"""`ompq eval`: top-1 of a model — FP32, or a bit-packed ompq checkpoint — on a test split.

A packed checkpoint runs on the packed runtime (`ompq.runtime.load`: weights stay bit-packed);
`--fake-quant` runs the fake-quant model of `ompq.packed.load_packed` instead, for comparison.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from .common import (UsageError, add_common_args, add_data_arg, add_model_arg, data_spec,
                     positive_int, print_table, resolve_data, resolve_model)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="top-1 / loss of a model or a packed checkpoint on a dataset",
        description="Evaluate the FP32 model, or with --packed the quantized model stored by "
                    "`ompq quantize --out` / `ompq.packed.save_packed` (loaded into --model's "
                    "architecture).")
    add_model_arg(p, " (with --packed: the architecture)")
    add_data_arg(p)
    p.add_argument("--split", default="test", help="dataset split (test)")
    p.add_argument("--packed", metavar="FILE", help="bit-packed checkpoint (.ompq) to evaluate, "
                   "run from its packed weights (ompq.runtime)")
    p.add_argument("--fake-quant", action="store_true",
                   help="with --packed: run the fake-quant model (float weights, "
                        "ompq.packed.load_packed) instead of the packed runtime, for comparison")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate the first N samples only")
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate and print one row (top-1 %, loss, n, seconds); the JSON result is that record
    (with the packed BitConfig's size MiB and GBOPs, and the engine: runtime or fake-quant)."""
    from ..evaluate import evaluate

    if args.fake_quant and not args.packed:
        raise UsageError("--fake-quant needs --packed FILE (the checkpoint to run)")
    data_name = data_spec(args.data, args.model)
    data = resolve_data(data_name, args.split, seed=args.seed)
    model, _ = resolve_model(args.model)
    record: dict[str, Any] = {"command": "eval", "model": args.model, "data": data_name,
                              "split": args.split, "method": "fp32"}
    label = "fp32"
    if args.packed:
        model, header = _load_packed(args.packed, model, args.fake_quant)
        cfg = header.get("bit_config") or {}
        engine = "fake-quant" if args.fake_quant else "runtime"
        record.update(method="packed", engine=engine, packed=args.packed,
                      size_mb=cfg.get("size_mb"), bops_g=cfg.get("bops_g"))
        label = f"packed ({engine})"
    t = time.perf_counter()
    r = evaluate(model, data, batch_size=args.batch_size, progress=args.progress,
                 max_samples=args.limit)
    record.update(top1=r["top1"], loss=r["loss"], n=r["n"], seconds=time.perf_counter() - t)
    print_table([[label, f"{r['top1']:.2f}", f"{r['loss']:.4f}", r["n"],
                  f"{record['seconds']:.1f}"]], ["model", "top-1 %", "loss", "n", "eval s"])
    return record


def _load_packed(path: str, model: Any, fake_quant: bool) -> tuple[Any, dict]:
    """(model, header) of the checkpoint at `path` loaded into the architecture `model`: the
    packed runtime, or the fake-quant model when `fake_quant`."""
    from ..packed import load_packed, read_packed_header
    from ..runtime import load

    header, _ = read_packed_header(path, data=False)  # the load below checks the data
    return (load_packed(path, model) if fake_quant else load(path, model)), header
