"""`ompq demo`: the main job on the embedded default model, offline, in a few minutes on a CPU.

profile (ORM on 64 training images) → allocate weight bits for an average of ``--avg-bits``
(size budget ``avg_bits × total weights / 8 / 2**20`` MiB, activations 8 bits) → PTQ
(AdaRound block reconstruction + LSQ activation steps) → top-1 on the Fashion-MNIST test split.
The same PTQ runs for the best uniform width that fits the same size, and the FP32 model is
evaluated too. Then the accuracy-against-size sweep (`ompq.frontier`): the default objective,
uniform, HAWQ-trace and the paper's objective at 2–6 bits per weight, round-to-nearest PTQ,
evaluated on the first 2 000 test images. Prints the tables (FP32, uniform, ompq; size MiB,
GBOPs, top-1 %, seconds per stage; the sweep) and writes a report folder (report.json, figures
with pareto.png as the headline, report.md, bit configs, the bit-packed checkpoint and the ONNX
QDQ model).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .quantize import (MIB, CLIError, add_common_args, emit_json, format_table, guard,
                       model_label, parse_bits, resolve_data, resolve_model, results_table,
                       run_flow, write_outputs)

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
    p.add_argument("--model", default="resnet20", help="zoo model (resnet20)")
    p.add_argument("--data", default="fashion-mnist", help="dataset spec (fashion-mnist)")
    p.add_argument("--avg-bits", type=float, default=3.0,
                   help="average weight bits defining the size budget (3)")
    p.add_argument("--bits", default="2,3,4,5,6,8",
                   help="candidate weight widths (2,3,4,5,6,8)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"AdaRound iterations per block ({DEFAULT_ITERS}; --fast {FAST['iters']})")
    p.add_argument("--act-iters", type=int, default=None,
                   help=f"LSQ iterations per block ({DEFAULT_ACT_ITERS})")
    p.add_argument("--calib-samples", type=int, default=None,
                   help=f"PTQ calibration samples ({DEFAULT_CALIB})")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on the first N test images (all; --fast 1000)")
    p.add_argument("--no-sweep", action="store_true",
                   help="skip the accuracy-against-size sweep (pareto.png then shows the results "
                        "only)")
    p.add_argument("--out", default="reports/demo", help="report folder (reports/demo)")
    p.add_argument("--fast", action="store_true",
                   help="CI size: few iterations, 1 000 test images (still the real pipeline)")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return guard("demo", lambda: _run(args), getattr(args, "debug", False))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    s = {"iters": DEFAULT_ITERS, "act_iters": DEFAULT_ACT_ITERS, "calib_samples": DEFAULT_CALIB,
         "profile_samples": 64, "eval_limit": None, "onnx_check_limit": 1000, **SWEEP}
    if args.fast:
        s.update(FAST)
    for key in ("iters", "act_iters", "calib_samples", "eval_limit"):
        if getattr(args, key) is not None:
            if getattr(args, key) < 0:
                raise CLIError(f"--{key.replace('_', '-')} must be >= 0")
            s[key] = getattr(args, key)
    return s


def _sweep(model: Any, flow: dict, args: argparse.Namespace, s: dict, progress: bool
           ) -> list[dict]:
    """Accuracy-against-size records of the default, uniform, HAWQ-trace and the paper's
    objective (round-to-nearest PTQ; `ompq.frontier`)."""
    from ..frontier import frontier

    return frontier(model, flow["profile"], resolve_data(args.data, "train"), flow["test"],
                    avg_bits=s["sweep_bits"], bits=parse_bits(args.bits),
                    eval_limit=s["sweep_eval"], seed=args.seed, hawq_iters=s["hawq_iters"],
                    progress=progress)


def _check_dependencies() -> None:
    """The demo ends with an ONNX export and an onnxruntime check: fail before the long work."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"ompq demo writes and checks an ONNX model and needs {' and '.join(missing)}"
                       f": pip install {' '.join(missing)}")


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _check_dependencies()
    if not 1.0 <= args.avg_bits <= 16.0:
        raise CLIError(f"--avg-bits {args.avg_bits}: expected a value in [1, 16], e.g. 3")
    s = _settings(args)
    progress = not args.no_progress
    model = resolve_model(args.model)
    from ..layers import find_layers

    params = sum(m.weight.numel() for _, m in find_layers(model))
    size_mb = args.avg_bits * params / (8 * MIB)
    flow = run_flow(model=model, model_name=model_label(args.model), data=args.data,
                    size_mb=size_mb, bops_g=None, mode="ptq", act_bits=8,
                    bits=parse_bits(args.bits), iters=s["iters"], act_iters=s["act_iters"],
                    calib_samples=s["calib_samples"], profile_samples=s["profile_samples"],
                    epochs=0, seed=args.seed, progress=progress, uniform=True,
                    eval_limit=s["eval_limit"])
    if not args.no_sweep:
        flow["sweep"] = _sweep(model, flow, args, s, progress)
    out = Path(args.out)
    facts = write_outputs(out, flow, onnx=True, onnx_check_limit=s["onnx_check_limit"],
                          progress=progress)
    total = time.perf_counter() - t0
    print(f"ompq demo: {model_label(args.model)} on {args.data}, budget {size_mb:.4f} MiB "
          f"(≈{args.avg_bits:g} bits/weight, {params} weights), activations 8 bits, PTQ "
          f"{s['iters']} AdaRound + {s['act_iters']} LSQ iterations/block, "
          f"{'first ' + str(s['eval_limit']) if s['eval_limit'] else 'all'} test images")
    print(results_table(flow["results"]))
    if flow.get("sweep"):
        from ..report import sweep_table_rows

        print(f"\naccuracy against size (round-to-nearest PTQ, top-1 % on the first "
              f"{s['sweep_eval']} test images, size MiB in brackets):")
        print(format_table(*sweep_table_rows(flow["sweep"])))
    pk = facts["packed"]
    line = (f"packed checkpoint {out / 'model.ompq'}: {pk['file_bytes']} bytes "
            f"(weights {pk['weight_bytes']} B vs BitConfig {pk['bitconfig_bytes']:.0f} B + "
            f"overhead {pk['overhead_bytes']} B)")
    print(line)
    if "onnx_check" in facts:
        oc = facts["onnx_check"]
        print(f"ONNX QDQ {out / 'model.onnx'}: onnxruntime vs PyTorch max |diff| "
              f"{oc['max_abs_diff']:.2e}, top-1 agreement {oc['top1_agreement']:.2f} % "
              f"on {oc['n']} images")
    print(f"report: {out / 'report.md'}   total {total:.1f} s")
    emit_json(args.json, {"command": "demo", "model": args.model, "settings": s,
                          "size_budget_mb": size_mb, "results": flow["results"],
                          "sweep": flow.get("sweep") or [],
                          "bit_config": json.loads(flow["bit_config"].to_json()),
                          "outputs": facts, "total_seconds": total})
    return 0
