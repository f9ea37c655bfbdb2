"""`ompq export`: packed checkpoint → ONNX (QDQ) checked in onnxruntime; bit-config interop."""
from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from ..bitconfig import BitConfig, read_bit_config, to_hawq_bit_config, write_layer_json
from ..checkpoint import write_text_atomic
from .common import (UsageError, add_common_args, add_data_arg, add_model_arg, data_spec,
                     positive_int, require, resolve_data, resolve_model)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="ONNX QDQ from a packed checkpoint; HAWQ / per-layer bit-config JSON",
        description="From --packed FILE (+ --model architecture): write --onnx (QuantizeLinear/"
                    "DequantizeLinear, checked in onnxruntime with --check-data). From "
                    "--packed or --bit-config JSON: write --hawq and/or --layer-json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--packed", metavar="FILE", help="bit-packed checkpoint (.ompq)")
    src.add_argument("--bit-config", metavar="JSON",
                     help="a BitConfig, per-layer or HAWQ JSON (for --hawq / --layer-json)")
    add_model_arg(p, " (the architecture of --packed)")
    p.add_argument("--onnx", metavar="PATH", help="write the ONNX QDQ model here")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (17; 21 for --int4)")
    p.add_argument("--int4", action="store_true", help="INT4/UINT4 initialisers for <= 4 bits")
    add_data_arg(p, "--check-data", "; 'none' skips the onnxruntime check")
    p.add_argument("--check-limit", type=positive_int, default=None,
                   help="first N samples only")
    p.add_argument("--hawq", metavar="PATH", help="write a HAWQ-V3-style bit_config dict")
    p.add_argument("--layer-json", metavar="PATH",
                   help='write {"layer": {"w_bits": b, "a_bits": a}} JSON')
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def _config(args: argparse.Namespace) -> Optional[BitConfig]:
    """The BitConfig of --packed (None if it carries none) or of --bit-config."""
    if args.bit_config:
        return read_bit_config(args.bit_config)
    from ..packed import read_packed_header

    header, _ = read_packed_header(args.packed, data=not args.onnx)  # --onnx loads (and checks)
    return BitConfig.from_json(header["bit_config"]) if header.get("bit_config") else None


def _onnx(args: argparse.Namespace) -> dict:
    """Export --packed as ONNX QDQ and compare onnxruntime with PyTorch on --check-data."""
    import torch

    from .. import zoo
    from ..onnx_export import check_onnx, export_onnx
    from ..packed import load_packed

    model = load_packed(args.packed, resolve_model(args.model)[0])
    spec = data_spec(args.check_data, args.model)
    data = None if spec.lower() == "none" else resolve_data(spec, "test", seed=args.seed)
    if data is not None:
        x = data[0][0] if isinstance(data[0], (tuple, list)) else data[0]
        example = x.unsqueeze(0)
    else:
        example = torch.zeros(1, *zoo.INPUT_SHAPE)
    info = export_onnx(model, args.onnx, example, opset=args.opset, int4=args.int4)
    print(f"ONNX: {args.onnx} ({info['bytes']} bytes, opset {info['opset']}, "
          f"{info['qdq_nodes']['QuantizeLinear']} QuantizeLinear / "
          f"{info['qdq_nodes']['DequantizeLinear']} DequantizeLinear, "
          f"{info['int4_initialisers']} INT4 initialisers)")
    out = {"onnx": info}
    if data is not None:
        chk = check_onnx(args.onnx, model, data, limit=args.check_limit, progress=args.progress)
        print(f"onnxruntime vs PyTorch on {chk['n']} samples: max |diff| "
              f"{chk['max_abs_diff']:.3e}, top-1 agreement {chk['top1_agreement']:.2f} %")
        out["onnx_check"] = chk
    return out


def run(args: argparse.Namespace) -> dict:
    """Write what was asked for; the JSON result holds the ONNX facts and the written paths."""
    if not (args.onnx or args.hawq or args.layer_json):
        raise UsageError("nothing to write: give --onnx PATH, --hawq PATH and/or --layer-json PATH")
    if args.onnx and not args.packed:
        raise UsageError("--onnx needs a quantized model: pass --packed FILE (from "
                         "`ompq quantize --out DIR`, DIR/model.ompq)")
    if args.onnx:
        checked = (args.check_data or "").lower() != "none"  # the check runs onnxruntime
        require("onnx", *(["onnxruntime"] if checked else []))
    cfg = _config(args)
    record: dict[str, Any] = {"command": "export"}
    if args.onnx:
        record.update(_onnx(args))
    if args.hawq or args.layer_json:
        if cfg is None:
            raise UsageError(f"{args.packed!r} carries no BitConfig; pass --bit-config JSON")
        if args.hawq:
            write_text_atomic(json.dumps(to_hawq_bit_config(cfg), indent=1), args.hawq)
            print(f"HAWQ bit_config: {args.hawq}")
            record["hawq"] = args.hawq
        if args.layer_json:
            write_layer_json(cfg, args.layer_json)
            print(f"per-layer bits: {args.layer_json}")
            record["layer_json"] = args.layer_json
    return record
