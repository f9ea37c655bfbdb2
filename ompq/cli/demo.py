"""`ompq demo`: the main job on the embedded default model, offline, in a few minutes on a CPU.

`ompq.pipeline` with a size budget of ``--avg-bits`` bits per weight (activations 8 bits), PTQ
(AdaRound block reconstruction + LSQ activation steps), the best uniform width at the same size
and the FP32 model, evaluated on the test split. Then the accuracy-against-size sweep
(`ompq.frontier`): the default objective, uniform, HAWQ-trace and the paper's objective at 2–6
bits per weight, round-to-nearest PTQ, on the first 2 000 test images. Prints the tables (size
MiB, GBOPs, top-1 %, seconds per stage; the sweep) and writes a report folder (report.json,
figures with pareto.png as the headline, report.md, bit configs, the bit-packed checkpoint and
the ONNX QDQ model).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..outputs import staged_dir
from ..pipeline import PipelineConfig, run_pipeline, write_outputs
from ..ptq import PTQConfig
from ..stages import stage
from .common import (add_common_args, add_data_arg, add_model_arg, add_out_dir_args, avg_bits,
                     bits_list, data_spec, nonneg_int, positive_int, print_results, print_table,
                     require, resolve_data, resolve_model)

#: Default reconstruction effort, sized so the demo (two PTQ runs) ends in < 5 min on 2 cores.
DEFAULT_ITERS = 300
DEFAULT_ACT_ITERS = 30
DEFAULT_CALIB = 512
#: --fast: fewer iterations, a calibration/eval subset — still the real pipeline (for CI).
FAST = {"iters": 10, "act_iters": 2, "calib_samples": 128, "profile_samples": 32,
        "eval_limit": 1000, "onnx_check_limit": 256, "sweep_bits": (2.0, 4.0),
        "sweep_eval": 500, "hawq_iters": 3}
#: The accuracy-against-size sweep: average widths, test images, Hutchinson vectors.
SWEEP = {"sweep_bits": (2.0, 3.0, 4.0, 5.0, 6.0), "sweep_eval": 2000, "hawq_iters": 30}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="profile → allocate (~3 bits) → PTQ → evaluate on the default model",
        description="The main job, offline: OMPQ mixed precision against uniform precision at "
                    "the same size and FP32, on the embedded Fashion-MNIST model. Prints one "
                    "table and writes a report folder.")
    add_model_arg(p)
    add_data_arg(p)
    p.add_argument("--avg-bits", type=avg_bits, default=3.0,
                   help="average weight bits defining the size budget, in [2, 16] (3)")
    p.add_argument("--bits", type=bits_list, default="2,3,4,5,6,8",
                   help="candidate weight widths, integers in 2..16 (2,3,4,5,6,8)")
    p.add_argument("--iters", type=nonneg_int, default=None,
                   help=f"AdaRound iterations per block ({DEFAULT_ITERS}; --fast {FAST['iters']})")
    p.add_argument("--act-iters", type=nonneg_int, default=None,
                   help=f"LSQ iterations per block ({DEFAULT_ACT_ITERS})")
    p.add_argument("--calib-samples", type=positive_int, default=None,
                   help=f"PTQ calibration samples ({DEFAULT_CALIB})")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate on the first N test images (all; --fast 1000)")
    p.add_argument("--no-sweep", action="store_true",
                   help="skip the accuracy-against-size sweep (pareto.png then shows the results "
                        "only)")
    add_out_dir_args(p, default="reports/demo", help_text="report folder")
    p.add_argument("--fast", action="store_true",
                   help="CI size: few iterations, 1 000 test images (still the real pipeline)")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's effort: defaults, --fast, then the explicit flags."""
    s = {"iters": DEFAULT_ITERS, "act_iters": DEFAULT_ACT_ITERS, "calib_samples": DEFAULT_CALIB,
         "profile_samples": 64, "eval_limit": None, "onnx_check_limit": 1000, **SWEEP}
    if args.fast:
        s.update(FAST)
    s.update({k: getattr(args, k) for k in ("iters", "act_iters", "calib_samples", "eval_limit")
              if getattr(args, k) is not None})
    return s


def _print_exports(out: Path, facts: dict) -> None:
    pk = facts["packed"]
    print(f"packed checkpoint {out / 'model.ompq'}: {pk['file_bytes']} bytes "
          f"(weights {pk['weight_bytes']} B vs BitConfig {pk['bitconfig_bytes']:.0f} B + "
          f"overhead {pk['overhead_bytes']} B)")
    oc = facts["onnx_check"]
    print(f"ONNX QDQ {out / 'model.onnx'}: onnxruntime vs PyTorch max |diff| "
          f"{oc['max_abs_diff']:.2e}, top-1 agreement {oc['top1_agreement']:.2f} % "
          f"on {oc['n']} images")


def run(args: argparse.Namespace) -> dict:
    """Pipeline, sweep, report folder; prints the tables. The JSON result holds the settings,
    the budget (MiB), the records, the sweep, the BitConfig and the export facts."""
    from ..bitconfig import CostModel
    from ..frontier import frontier
    from ..report import sweep_table_rows

    t0 = time.perf_counter()
    require("ortools", "matplotlib", "onnx", "onnxruntime")
    s = _settings(args)
    config = PipelineConfig(
        mode="ptq", avg_bits=args.avg_bits, bits=args.bits, act_bits=8,
        profile_samples=s["profile_samples"], eval_limit=s["eval_limit"], uniform=True,
        seed=args.seed, progress=args.progress,
        ptq=PTQConfig(num_samples=s["calib_samples"], iters=s["iters"],
                      act_iters=s["act_iters"]))
    model, label = resolve_model(args.model)
    data = data_spec(args.data, args.model)
    train = resolve_data(data, "train", seed=args.seed)
    test = resolve_data(data, "test", seed=args.seed)
    result = run_pipeline(model, train, test, config, name=label)
    sweep = [] if args.no_sweep else frontier(
        model, result.profile, train, test, avg_bits=s["sweep_bits"], bits=config.bits,
        eval_limit=s["sweep_eval"], seed=args.seed, hawq_iters=s["hawq_iters"],
        progress=args.progress)
    out = Path(args.out)
    with stage("writing the report folder"), \
            staged_dir(out, overwrite=args.overwrite, command="demo") as tmp:
        facts = write_outputs(tmp, result, onnx_data=test,
                              onnx_check_limit=s["onnx_check_limit"], sweep=sweep,
                              progress=args.progress)
    total = time.perf_counter() - t0
    params = CostModel.from_layers(result.profile.layers).total_params
    print(f"ompq demo: {label} on {data}, budget {result.size_budget_mb:.4f} MiB "
          f"(≈{args.avg_bits:g} bits/weight, {params} weights), activations 8 bits, PTQ "
          f"{s['iters']} AdaRound + {s['act_iters']} LSQ iterations/block, "
          f"{'first ' + str(s['eval_limit']) if s['eval_limit'] else 'all'} test images")
    print_results(result.results)
    if sweep:
        print(f"\naccuracy against size (round-to-nearest PTQ, top-1 % on the first "
              f"{s['sweep_eval']} test images, size MiB in brackets):")
        header, rows = sweep_table_rows(sweep)
        print_table(rows, header)
    _print_exports(out, facts)
    print(f"report: {out / 'report.md'}   total {total:.1f} s")
    return {"command": "demo", "model": args.model, "data": data, "settings": s,
            **result.to_dict(), "sweep": sweep, "outputs": facts, "total_seconds": total}
