"""`ompq quantize`: the whole flow — profile → allocate → PTQ or QAT → evaluate → export/report.

Also home of the flow helpers shared by the product commands (`demo`, `eval`, `export`,
`report`): model/data resolution with clear errors, the uniform baseline, result records, the
results table and ``--json`` output. A user error (unknown model, unreadable data, infeasible
budget, layer names that do not match, ...) ends the command with exit code 2 and one line on
stderr; set ``OMPQ_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn

from ._common import EXIT_USAGE

#: Candidate weight widths per mode (SPEC §4: the reference searches 2–4 bits for PTQ).
DEFAULT_BITS = {"ptq": "2,3,4", "qat": "2,3,4,5,6,8"}
MIB = 2 ** 20


class CLIError(ValueError):
    """A user error the CLI reports as one line on stderr with exit code 2."""


# ============================================================================ error handling
def guard(command: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run `body`; turn user errors into ``ompq <command>: error: <message>`` and exit code 2
    (`debug` or ``OMPQ_DEBUG=1``: raise instead, with the traceback)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"ompq {command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, KeyError) as err:
        if debug or os.environ.get("OMPQ_DEBUG"):
            raise
        msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        msg = " ".join(msg.split()) or type(err).__name__
        print(f"ompq {command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


# ============================================================================ resolution
def resolve_model(spec: str) -> nn.Module:
    """A model from a zoo name, ``module.path:factory`` or a saved file (eval mode, FP32), via
    the CLI's shared resolver (`ompq.cli._common.resolve_model`)."""
    from ._common import resolve_model as common_resolve

    model, _label = common_resolve(spec)
    return model.eval()


def model_label(spec: str) -> str:
    return Path(spec).name if os.path.isfile(spec) else spec


def resolve_data(spec: str, split: str) -> Any:
    """A Dataset from ``fashion-mnist`` or ``imagefolder:PATH`` (see `ompq.data.load_dataset`)."""
    from .. import data

    try:
        ds = data.load_dataset(spec, split)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read data {spec!r} (split {split!r}): {err}; valid: "
                       "--data fashion-mnist or --data imagefolder:PATH") from None
    if len(ds) == 0:
        raise CLIError(f"data {spec!r} (split {split!r}) has no samples")
    return ds


def load_bit_config(path: str, layer_names: Optional[Sequence[str]] = None) -> Any:
    """A BitConfig from a JSON file: a BitConfig, a per-layer ``{"layer": {"w_bits",
    "a_bits"}}`` dict or a HAWQ-V3-style ``{"layer": bits, "layer_act": bits}`` dict."""
    from .. import export
    from ..allocate import BitConfig

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CLIError(f"cannot read bit config {path!r}: {err}") from None
    if not isinstance(d, dict) or not d:
        raise CLIError(f"bit config {path!r} must be a non-empty JSON object")
    if d.get("format") == "ompq.BitConfig":
        cfg = BitConfig.from_json(path)
        if layer_names is not None:
            export._check_names(cfg.weight_bits, cfg.act_bits, layer_names, f"bit config {path!r}")
        return cfg
    if all(isinstance(v, dict) for v in d.values()):
        return export.from_layer_json(d, layer_names=layer_names)
    return export.from_hawq_bit_config(d, layer_names=layer_names)


def complete_config(cfg: Any, prof: Any) -> Any:
    """Fill size (MiB) and BOPs (GBOPs) of an imported BitConfig from the profile's layers."""
    params = {l.name: l.params for l in prof.layers}
    macs = {l.name: l.macs for l in prof.layers}
    cfg.size_mb = sum(params[n] * b for n, b in cfg.weight_bits.items()) / (8 * MIB)
    cfg.bops_g = sum(macs[n] * b * cfg.act_bits.get(n, 8)
                     for n, b in cfg.weight_bits.items()) / 1e9
    return cfg


# ============================================================================ budgets
def total_params(prof: Any) -> int:
    return sum(l.params for l in prof.layers)


def fp32_record(prof: Any, top1: float, seconds: Mapping[str, float]) -> dict:
    """Result record of the float model (32-bit weights and activations)."""
    return {"method": "fp32", "size_mb": total_params(prof) * 32 / (8 * MIB),
            "bops_g": sum(l.macs for l in prof.layers) * 32 * 32 / 1e9, "top1": top1,
            "w_bits": None, "a_bits": None, "seconds": dict(seconds)}


def uniform_config(prof: Any, *, size_mb: Optional[float], bops_g: Optional[float],
                   bits: Sequence[int], act_bits: int) -> Any:
    """The highest uniform weight width in `bits` that fits the budget, as a BitConfig
    (allocated by the ILP with a single candidate width)."""
    from ..allocate import InfeasibleBudgetError, allocate

    P = total_params(prof)
    M = sum(l.macs for l in prof.layers)
    fits = [b for b in sorted(set(bits))
            if (size_mb is None or P * b / (8 * MIB) <= size_mb * (1 + 1e-9))
            and (bops_g is None or M * b * act_bits / 1e9 <= bops_g * (1 + 1e-9))]
    if not fits:
        raise InfeasibleBudgetError(
            f"no uniform width in {sorted(set(bits))} fits size_mb={size_mb} / bops_g={bops_g}; "
            f"the smallest ({min(bits)} bits) needs {P * min(bits) / (8 * MIB):.4f} MiB and "
            f"{M * min(bits) * act_bits / 1e9:.4f} GBOPs")
    cfg = allocate(prof, size_mb=size_mb, bops_g=bops_g, bits=(max(fits),), act_bits=act_bits)
    cfg.proxy = "uniform"
    return cfg


def parse_bits(text: str) -> tuple[int, ...]:
    """``"2,3,4,8"`` -> (2, 3, 4, 8); a clear error otherwise."""
    try:
        bits = tuple(sorted({int(t) for t in text.replace(" ", "").split(",") if t}))
    except ValueError:
        raise CLIError(f"--bits {text!r}: expected comma-separated integers, e.g. 2,3,4,5,6,8") \
            from None
    if not bits or any(b < 1 or b > 16 for b in bits):
        raise CLIError(f"--bits {text!r}: widths must lie in 1..16")
    return bits


# ============================================================================ output
def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, sep] + body)


def results_table(results: Sequence[Mapping[str, Any]]) -> str:
    from ..report import results_table_rows

    return format_table(*results_table_rows(results))


def emit_json(path: Optional[str], payload: Mapping[str, Any]) -> None:
    """Write `payload` as JSON to `path` (``-`` = stdout)."""
    if not path:
        return
    from ..report import _clean

    text = json.dumps(_clean(payload), indent=1)
    if path == "-":
        print(text)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the result as JSON to PATH ('-' = stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")


# ============================================================================ the flow
def quantize_model(model: nn.Module, cfg: Any, mode: str, train: Any, *, act_bits: int,
                   iters: Optional[int], act_iters: Optional[int], calib_samples: int,
                   epochs: int, seed: int, progress: bool, max_steps: Optional[int] = None
                   ) -> tuple[nn.Module, dict]:
    """PTQ or QAT of `model` (not modified) to `cfg`; returns (quantized model, stats)."""
    stats: dict[str, Any] = {}
    if mode == "ptq":
        from ..ptq import ptq

        q = ptq(model, cfg, train, num_samples=calib_samples, iters=iters, act_iters=act_iters,
                seed=seed, progress=progress, act_bits=act_bits, stats=stats)
    elif mode == "qat":
        from ..qat import qat

        q = qat(model, cfg, train, epochs=epochs, seed=seed, act_bits=act_bits,
                max_steps=max_steps, progress=progress, stats=stats)
    else:
        raise CLIError(f"--mode {mode!r}: valid modes are ptq and qat")
    return q.eval(), stats


def run_flow(*, model: nn.Module, model_name: str, data: str, size_mb: Optional[float],
             bops_g: Optional[float], mode: str, act_bits: int, bits: Sequence[int],
             iters: Optional[int], act_iters: Optional[int], calib_samples: int,
             profile_samples: int, epochs: int, seed: int, progress: bool,
             uniform: bool, eval_limit: Optional[int], bit_config_path: Optional[str] = None,
             max_steps: Optional[int] = None) -> dict:
    """profile → allocate → quantize → evaluate, plus FP32 (and optionally uniform) baselines.

    Returns ``{"profile", "bit_config", "models": {method: nn.Module}, "results": [records]}``;
    each record has method, size_mb (MiB), bops_g (GBOPs), top1 (%), w_bits, a_bits and
    seconds per stage.
    """
    from ..allocate import allocate
    from ..evaluate import evaluate
    from ..profile import profile

    train, test = resolve_data(data, "train"), resolve_data(data, "test")
    t = time.perf_counter()
    prof = profile(model, train, num_samples=profile_samples, seed=seed, progress=progress,
                   description=model_name)
    t_prof = time.perf_counter() - t
    t = time.perf_counter()
    if bit_config_path:
        cfg = complete_config(load_bit_config(bit_config_path, prof.names), prof)
    else:
        from ..allocate import InfeasibleBudgetError

        try:
            cfg = allocate(prof, size_mb=size_mb, bops_g=bops_g, bits=tuple(bits),
                           act_bits=act_bits, seed=seed)
        except InfeasibleBudgetError as err:
            raise CLIError(f"{err}; choose --size-mb/--bops-g inside that range or change the "
                           f"candidate widths --bits (now {','.join(map(str, bits))})") from None
    t_alloc = time.perf_counter() - t

    def _eval(m: nn.Module) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = evaluate(m, test, progress=progress, max_samples=eval_limit)
        return r["top1"], time.perf_counter() - t0

    results, models = [], {}
    top1, t_eval = _eval(model)
    results.append(fp32_record(prof, top1, {"eval": t_eval}))
    runs = [("uniform", None)] if uniform else []
    runs.append(("ompq", cfg))
    for method, c in runs:
        t = time.perf_counter()
        if c is None:
            c = uniform_config(prof, size_mb=cfg.size_mb if size_mb is None else size_mb,
                               bops_g=bops_g, bits=bits, act_bits=act_bits)
        t_a = time.perf_counter() - t
        t = time.perf_counter()
        q, _ = quantize_model(model, c, mode, train, act_bits=act_bits, iters=iters,
                              act_iters=act_iters, calib_samples=calib_samples, epochs=epochs,
                              seed=seed, progress=progress, max_steps=max_steps)
        t_q = time.perf_counter() - t
        top1, t_eval = _eval(q)
        secs = {"profile": t_prof, "allocate": t_alloc, mode: t_q, "eval": t_eval} \
            if method == "ompq" else {"allocate": t_a, mode: t_q, "eval": t_eval}
        results.append({"method": method, "size_mb": c.size_mb, "bops_g": c.bops_g,
                        "top1": top1, "w_bits": dict(c.weight_bits), "a_bits": dict(c.act_bits),
                        "seconds": secs})
        models[method] = (q, c)
    return {"profile": prof, "bit_config": cfg, "models": models, "results": results,
            "test": test}


def write_outputs(out: Path, flow: Mapping[str, Any], *, onnx: bool = True,
                  onnx_check_limit: Optional[int] = 1000, progress: bool = False) -> dict:
    """Write the report folder plus bit configs, the packed checkpoint and the ONNX file of
    the ompq model into `out`. Returns a dict of paths and export facts."""
    from .. import export
    from ..report import write_report

    out.mkdir(parents=True, exist_ok=True)
    prof, cfg = flow["profile"], flow["bit_config"]
    q, qcfg = flow["models"]["ompq"]
    prof.to_json(out / "profile.json")
    cfg.to_json(out / "bit_config.json")
    export.write_layer_json(cfg, out / "bits_per_layer.json")
    (out / "hawq_bit_config.json").write_text(json.dumps(export.to_hawq_bit_config(cfg), indent=1))
    info = export.save_packed(q, out / "model.ompq", qcfg)
    facts: dict[str, Any] = {"packed": info.to_dict()}
    if onnx:
        test = flow["test"]
        from ..data import sample_batch

        ex = sample_batch(test, 2, seed=0)
        facts["onnx"] = export.export_onnx(q, out / "model.onnx", ex)
        facts["onnx_check"] = export.check_onnx(out / "model.onnx", q, test,
                                                limit=onnx_check_limit, progress=progress)
    paths = write_report(out, profile=prof, bit_config=cfg, results=flow["results"],
                         sweep=flow.get("sweep") or ())
    facts["report"] = {k: str(v) for k, v in paths.items()}
    (out / "export.json").write_text(json.dumps(facts, indent=1, default=str))
    return facts


# ============================================================================ the command
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="profile, allocate bits, PTQ/QAT and evaluate (the whole flow)",
        description="The whole flow: profile the model (ORM), allocate per-layer weight bits "
                    "under a size or BOPs budget (exact ILP), quantize (PTQ or QAT), evaluate "
                    "top-1 on the test split, and write the report/exports with --out.")
    p.add_argument("--model", default="resnet20",
                   help="zoo name, module.path:factory or a saved model file (resnet20)")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist or imagefolder:PATH (fashion-mnist)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--size-mb", type=float, help="budget: MiB of quantized weights")
    budget.add_argument("--bops-g", type=float, help="budget: GBOPs per sample")
    budget.add_argument("--bit-config", metavar="JSON",
                        help="use this allocation (BitConfig, per-layer or HAWQ JSON) instead "
                             "of searching")
    p.add_argument("--mode", choices=("ptq", "qat"), default="ptq")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits (8)")
    p.add_argument("--bits", default=None,
                   help="candidate weight widths (ptq: 2,3,4 as the reference; qat: 2,3,4,5,6,8)")
    p.add_argument("--max-steps", type=int, default=None, help="QAT: stop after N steps")
    p.add_argument("--iters", type=int, default=None, help="AdaRound iterations per block")
    p.add_argument("--act-iters", type=int, default=None, help="LSQ iterations per block")
    p.add_argument("--calib-samples", type=int, default=1024, help="PTQ calibration samples")
    p.add_argument("--profile-samples", type=int, default=64, help="ORM samples (64)")
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs (1)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N only")
    p.add_argument("--uniform", action="store_true", help="also run uniform at the same size")
    p.add_argument("--out", default=None, help="write the report folder and exports here")
    p.add_argument("--no-onnx", action="store_true", help="with --out: skip the ONNX export")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return guard("quantize", lambda: _run(args), getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> int:
    if args.size_mb is None and args.bops_g is None and args.bit_config is None:
        raise CLIError("give a budget: --size-mb MiB or --bops-g GBOPs (or --bit-config JSON)")
    for flag, v in (("--size-mb", args.size_mb), ("--bops-g", args.bops_g)):
        if v is not None and v <= 0:
            raise CLIError(f"{flag} must be positive, got {v}")
    progress = not args.no_progress
    model = resolve_model(args.model)
    flow = run_flow(model=model, model_name=model_label(args.model), data=args.data,
                    size_mb=args.size_mb, bops_g=args.bops_g, mode=args.mode,
                    act_bits=args.act_bits, bits=parse_bits(args.bits or DEFAULT_BITS[args.mode]),
                    iters=args.iters,
                    act_iters=args.act_iters, calib_samples=args.calib_samples,
                    profile_samples=args.profile_samples, epochs=args.epochs, seed=args.seed,
                    progress=progress, uniform=args.uniform, eval_limit=args.eval_limit,
                    bit_config_path=args.bit_config, max_steps=args.max_steps)
    print(results_table(flow["results"]))
    payload: dict[str, Any] = {"command": "quantize", "model": args.model, "data": args.data,
                               "mode": args.mode, "results": flow["results"],
                               "bit_config": json.loads(flow["bit_config"].to_json())}
    if args.out:
        payload["outputs"] = write_outputs(Path(args.out), flow, onnx=not args.no_onnx,
                                           progress=progress)
        print(f"report: {Path(args.out) / 'report.md'}")
    emit_json(args.json, payload)
    return 0
