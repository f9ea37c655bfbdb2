"""`ompq export`: packed checkpoint → ONNX (QDQ) checked in onnxruntime; bit-config interop."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .quantize import (CLIError, add_common_args, emit_json, guard, load_bit_config,
                       resolve_data, resolve_model)


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
    p.add_argument("--model", default="resnet20", help="architecture of --packed (resnet20)")
    p.add_argument("--onnx", metavar="PATH", help="write the ONNX QDQ model here")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17; 21 for --int4)")
    p.add_argument("--int4", action="store_true", help="INT4/UINT4 initialisers for <= 4 bits")
    p.add_argument("--check-data", metavar="SPEC", default="fashion-mnist",
                   help="compare onnxruntime with PyTorch on this data ('none' to skip)")
    p.add_argument("--check-limit", type=int, default=None, help="first N samples only")
    p.add_argument("--hawq", metavar="PATH", help="write a HAWQ-V3-style bit_config dict")
    p.add_argument("--layer-json", metavar="PATH",
                   help='write {"layer": {"w_bits": b, "a_bits": a}} JSON')
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return guard("export", lambda: _run(args), getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> int:
    from .. import export

    if not (args.onnx or args.hawq or args.layer_json):
        raise CLIError("nothing to write: give --onnx PATH, --hawq PATH and/or --layer-json PATH")
    record: dict[str, Any] = {"command": "export"}
    cfg = None
    if args.packed:
        header, _ = export.read_packed_header(args.packed)
        if header.get("bit_config"):
            from ..allocate import BitConfig
            cfg = BitConfig.from_json(header["bit_config"])
    else:
        if args.onnx:
            raise CLIError("--onnx needs a quantized model: pass --packed FILE (from "
                           "`ompq quantize --out DIR`, DIR/model.ompq)")
        cfg = load_bit_config(args.bit_config)
    if args.onnx:
        record.update(_onnx(args))
    if args.hawq or args.layer_json:
        if cfg is None:
            raise CLIError(f"{args.packed!r} carries no BitConfig; pass --bit-config JSON")
        if args.hawq:
            Path(args.hawq).parent.mkdir(parents=True, exist_ok=True)
            Path(args.hawq).write_text(json.dumps(export.to_hawq_bit_config(cfg), indent=1))
            print(f"HAWQ bit_config: {args.hawq}")
            record["hawq"] = args.hawq
        if args.layer_json:
            export.write_layer_json(cfg, args.layer_json)
            print(f"per-layer bits: {args.layer_json}")
            record["layer_json"] = args.layer_json
    emit_json(args.json, record)
    return 0


def _onnx(args: argparse.Namespace) -> dict:
    from .. import export

    model = export.load_packed(args.packed, resolve_model(args.model))
    data = None if args.check_data.lower() == "none" else resolve_data(args.check_data, "test")
    if data is not None:
        x = data[0][0] if isinstance(data[0], (tuple, list)) else data[0]
        example = x.unsqueeze(0)
    else:
        from .. import zoo
        import torch
        example = torch.zeros(1, *zoo.INPUT_SHAPE)
    info = export.export_onnx(model, args.onnx, example, opset=args.opset, int4=args.int4)
    print(f"ONNX: {args.onnx} ({info['bytes']} bytes, opset {info['opset']}, "
          f"{info['qdq_nodes']['QuantizeLinear']} QuantizeLinear / "
          f"{info['qdq_nodes']['DequantizeLinear']} DequantizeLinear, "
          f"{info['int4_initialisers']} INT4 initialisers)")
    out = {"onnx": info}
    if data is not None:
        chk = export.check_onnx(args.onnx, model, data, limit=args.check_limit,
                                progress=not args.no_progress)
        print(f"onnxruntime vs PyTorch on {chk['n']} samples: max |diff| "
              f"{chk['max_abs_diff']:.3e}, top-1 agreement {chk['top1_agreement']:.2f} %")
        out["onnx_check"] = chk
    return out
