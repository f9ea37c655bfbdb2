"""`ompq quantize`: the whole flow (`ompq.pipeline`): profile → allocate → PTQ or QAT →
evaluate, and with --out the report folder, the packed checkpoint and the ONNX model."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..allocate import InfeasibleBudgetError
from ..outputs import staged_dir
from ..pipeline import DEFAULT_BITS, PipelineConfig, run_pipeline, write_outputs
from ..ptq import PTQConfig
from ..qat import QATConfig
from ..stages import stage
from .common import (UsageError, add_common_args, add_data_arg, add_model_arg, add_out_dir_args,
                     bit_width, bits_list, data_spec, nonneg_int, positive_float, positive_int,
                     print_results, require, resolve_data, resolve_model)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="profile, allocate bits, PTQ/QAT and evaluate (the whole flow)",
        description="The whole flow: profile the model (ORM), allocate per-layer weight bits "
                    "under a size or BOPs budget (exact ILP), quantize (PTQ or QAT), evaluate "
                    "top-1 on the test split, and write the report/exports with --out.")
    add_model_arg(p)
    add_data_arg(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--size-mb", type=positive_float, help="budget: MiB of quantized weights")
    budget.add_argument("--bops-g", type=positive_float, help="budget: GBOPs per sample")
    budget.add_argument("--bit-config", metavar="JSON",
                        help="use this allocation (BitConfig, per-layer or HAWQ JSON) instead "
                             "of searching")
    p.add_argument("--mode", choices=("ptq", "qat"), default="ptq")
    p.add_argument("--act-bits", type=bit_width, default=8, help="activation bits, 2..16 (8)")
    bits = {m: ",".join(map(str, b)) for m, b in DEFAULT_BITS.items()}
    p.add_argument("--bits", type=bits_list, default=None,
                   help=f"candidate weight widths, integers in 2..16 (ptq: {bits['ptq']} as the "
                        f"reference; qat: {bits['qat']})")
    p.add_argument("--max-steps", type=positive_int, default=None, help="QAT: stop after N steps")
    p.add_argument("--iters", type=nonneg_int, default=None, help="AdaRound iterations per block")
    p.add_argument("--act-iters", type=nonneg_int, default=None, help="LSQ iterations per block")
    p.add_argument("--calib-samples", type=positive_int, default=1024,
                   help="PTQ calibration samples (1024)")
    p.add_argument("--profile-samples", type=positive_int, default=64, help="ORM samples (64)")
    p.add_argument("--epochs", type=positive_int, default=1, help="QAT epochs (1)")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate on the first N only")
    p.add_argument("--uniform", action="store_true", help="also run uniform at the same size")
    add_out_dir_args(p)
    p.add_argument("--no-onnx", action="store_true", help="with --out: skip the ONNX export")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def _require(args: argparse.Namespace) -> None:
    """The optional modules this run needs, checked before any work: ortools for an
    allocation, matplotlib for --out's figures, onnx/onnxruntime for its ONNX model."""
    if args.bit_config is None or args.uniform:
        require("ortools")
    if args.out:
        require("matplotlib")
        if not args.no_onnx:
            require("onnx", "onnxruntime", hint=" (or pass --no-onnx)")


def run(args: argparse.Namespace) -> dict:
    """Run the pipeline, print the results table (and write --out); the JSON result holds the
    records, the BitConfig and the export facts."""
    if args.size_mb is None and args.bops_g is None and args.bit_config is None:
        raise UsageError("give a budget: --size-mb MiB or --bops-g GBOPs (or --bit-config JSON)")
    _require(args)
    config = PipelineConfig(
        mode=args.mode, size_mb=args.size_mb, bops_g=args.bops_g, bits=args.bits,
        act_bits=args.act_bits, profile_samples=args.profile_samples,
        eval_limit=args.eval_limit, uniform=args.uniform, seed=args.seed,
        progress=args.progress,
        ptq=PTQConfig(num_samples=args.calib_samples, iters=args.iters,
                      act_iters=args.act_iters),
        qat=QATConfig(epochs=args.epochs, max_steps=args.max_steps))
    model, label = resolve_model(args.model)
    data = data_spec(args.data, args.model)
    train = resolve_data(data, "train", seed=args.seed)
    test = resolve_data(data, "test", seed=args.seed)
    try:
        result = run_pipeline(model, train, test, config, bit_config=args.bit_config,
                              name=label)
    except InfeasibleBudgetError as err:
        raise UsageError(f"{err}; choose --size-mb/--bops-g inside that range or change the "
                         f"candidate widths --bits (now {','.join(map(str, config.bits))})"
                         ) from None
    print_results(result.results)
    payload: dict[str, Any] = {"command": "quantize", "model": args.model, "data": data,
                               **result.to_dict()}
    if args.out:
        with stage("writing the report folder"), \
                staged_dir(args.out, overwrite=args.overwrite, command="quantize") as tmp:
            payload["outputs"] = write_outputs(tmp, result, progress=args.progress,
                                               onnx_data=None if args.no_onnx else test)
        print(f"report: {Path(args.out) / 'report.md'}")
    return payload
