"""ONNX export of quantized models with QuantizeLinear/DequantizeLinear nodes, checked in
onnxruntime: `export_onnx`, `check_onnx`.

The float graph is exported with the TorchScript exporter (``dynamo=False``) from a twin of the
model in which every weight quantizer is a ``DequantizeLinear`` of an int8/uint8 initialiser (per
output channel, ``axis`` = the quantizer's axis; INT4/UINT4 initialisers with ``int4=True`` at
opset ≥ 21 for ≤ 4-bit layers) and every activation quantizer is ``QuantizeLinear → Clip(qmin,
qmax) → DequantizeLinear`` (per tensor; the Clip enforces grids narrower than 8 bits).
"""
from __future__ import annotations

import copy
import io
import os
import time
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import atomic_path
from .data import iter_batches
from .inputs import leaves, num_rows, to_device
from .packed import weight_codes
from .quantize import act_quantizer, quant_layers, swap_quantizers, weight_quantizer
from .stages import stage
from .trace import call_model, main_output

PathLike = Union[str, os.PathLike]
_LEGACY_MAX_OPSET = 20


_ONNX_INT = {  # (signed, container bits) -> torch dtype of the QDQ integer tensors
    (True, 8): torch.int8, (False, 8): torch.uint8,
    (True, 16): torch.int16, (False, 16): torch.uint16,
}


def _container(qmin: int, qmax: int, opset: int, what: str) -> torch.dtype:
    signed = qmin < 0
    width = 8 if (qmin >= -128 and qmax <= 127) or (qmin >= 0 and qmax <= 255) else 16
    if width == 8 and not signed and qmax > 255:
        width = 16
    if width == 16 and opset < 21:
        raise ValueError(f"{what}: grid [{qmin}, {qmax}] needs 16-bit QDQ, which ONNX allows "
                         f"from opset 21; pass opset=21 or use <= 8 bits")
    return _ONNX_INT[(signed, width)]


class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized weight `(q − zp)·scale`; ONNX: DequantizeLinear(int initialiser)."""

    @staticmethod
    def forward(ctx, w, codes, scale, zp, axis):  # noqa: D401
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.to(torch.float32) - zp.to(torch.float32).reshape(shape)) \
            * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w, codes, scale, zp, axis):
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=axis)


class _ActQDQ(torch.autograd.Function):
    """Forward: fake quantization; ONNX: QuantizeLinear → Clip(qmin, qmax) → DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax, dtype_code):
        return (torch.clamp(torch.round(x * (1.0 / scale)) + zp.float(), qmin, qmax)
                - zp.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, dtype_code):
        dtype = _DTYPE_CODES[dtype_code]
        q = g.op("QuantizeLinear", x, scale, zp)
        info = torch.iinfo(dtype)
        if qmin > info.min or qmax < info.max:
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zp)


_DTYPE_CODES = {0: torch.int8, 1: torch.uint8, 2: torch.int16, 3: torch.uint16}
_CODE_OF = {v: k for k, v in _DTYPE_CODES.items()}


class _OnnxWeight(nn.Module):
    def __init__(self, name: str, layer: nn.Module, opset: int) -> None:
        super().__init__()
        codes, qmin, qmax = weight_codes(name, layer)
        wq = weight_quantizer(layer)
        dtype = _container(qmin, qmax, opset, f"layer {name!r} weights")
        self.axis = int(wq.axis)
        self.register_buffer("codes", torch.from_numpy(codes).to(dtype))
        self.register_buffer("scale", wq.scale.detach().float().reshape(-1).clone())
        self.register_buffer("zp", wq.zero_point.detach().round().to(dtype).reshape(-1).clone())

    def forward(self, w: Tensor) -> Tensor:
        return _WeightDQ.apply(w, self.codes, self.scale, self.zp, self.axis)


class _OnnxAct(nn.Module):
    def __init__(self, name: str, aq: nn.Module, opset: int) -> None:
        super().__init__()
        qmin, qmax = int(aq.qmin), int(aq.qmax)
        dtype = _container(qmin, qmax, opset, f"layer {name!r} input activations")
        self.qmin, self.qmax, self.code = qmin, qmax, _CODE_OF[dtype]
        self.register_buffer("scale", aq.scale.detach().float().reshape(()).clone())
        self.register_buffer("zp", aq.zero_point.detach().round().to(dtype).reshape(()).clone())

    def forward(self, x: Tensor) -> Tensor:
        return _ActQDQ.apply(x, self.scale, self.zp, self.qmin, self.qmax, self.code)


def _onnx_twin(model: nn.Module, opset: int) -> nn.Module:
    twin = copy.deepcopy(model).cpu().eval()
    layers = quant_layers(twin)
    if not layers:
        raise ValueError("export_onnx: the model has no quantized layers; quantize it first "
                         "(ompq.quantize_ / ompq.ptq / ompq.qat)")
    for name, m in layers:
        aq = act_quantizer(m)
        if aq is not None and aq.observing:
            raise ValueError(f"layer {name!r}: activation quantizer is still observing; "
                             "calibrate (ompq.quantize.calibrate_activations) first")
        act = None if aq is None else (_OnnxAct(name, aq, opset) if aq.enabled
                                       else nn.Identity())
        swap_quantizers(m, weight=_OnnxWeight(name, m, opset), act=act)
    return twin


def _to_initialisers(model_proto, int4: bool) -> None:
    """Turn Constant nodes into initialisers, optionally pack ≤4-bit weight codes as INT4/UINT4,
    and drop unused initialisers (the float weights the DequantizeLinear nodes replace)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    consts = [n for n in graph.node if n.op_type == "Constant"]
    for node in consts:
        attr = next(a for a in node.attribute if a.name == "value")
        tensor = attr.t
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    if int4:
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            codes = numpy_helper.to_array(inits[node.input[0]])
            zp = numpy_helper.to_array(inits[node.input[2]])
            lo, hi = (-8, 7) if codes.dtype == np.int8 else (0, 15)
            if codes.dtype not in (np.int8, np.uint8) or codes.min() < lo or codes.max() > hi \
                    or zp.min() < lo or zp.max() > hi:
                continue
            et = onnx.TensorProto.INT4 if codes.dtype == np.int8 else onnx.TensorProto.UINT4
            for idx, arr in ((0, codes), (2, zp)):
                name = node.input[idx]
                new = helper.make_tensor(name, et, arr.shape, arr.reshape(-1).tolist())
                graph.initializer.remove(inits[name])
                graph.initializer.append(new)
                inits[name] = new
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    names = {i.name for i in graph.initializer}
    for inp in list(graph.input):
        if inp.name in names:
            graph.input.remove(inp)


@stage("ONNX export")
def _onnx_inputs(example: Any, input_name: str) -> tuple[tuple, list[str], dict]:
    """(export args, input names, dynamic axes) of an example batch of any form: one tensor
    (named `input_name`), a tuple (`input_name`_0, …) or a dict (its keys, passed as keyword
    arguments). Dim 0 is dynamic ("batch"), and dim 1 of 2-D integer inputs ("sequence")."""
    tensors = [v.detach().cpu() for _, v in leaves(example)]
    if isinstance(example, dict):
        names = [k for k, v in example.items() if isinstance(v, Tensor)]
        args = (dict(zip(names, tensors)),)
    elif isinstance(example, (tuple, list)):
        if len(tensors) != len(example):
            raise ValueError("the ONNX export needs every positional input to be a tensor, got "
                             f"{[type(v).__name__ for v in example]}; pass the others as keyword "
                             "inputs (a dict) or bind them in the model")
        args, names = tuple(tensors), [f"{input_name}_{k}" for k in range(len(tensors))]
    else:
        args, names = (tensors[0],), [input_name]
    axes = {}
    for name, t in zip(names, tensors):
        axes[name] = {0: "batch"}
        if t.dim() == 2 and not t.is_floating_point():
            axes[name][1] = "sequence"
    return args, names, axes


def _feeds(sess: Any, x: Any) -> dict:
    """onnxruntime feeds for a batch of any form (float inputs as float32)."""
    out = {}
    for meta, (_, t) in zip(sess.get_inputs(), leaves(x)):
        t = t.detach().cpu()
        out[meta.name] = (t.float() if t.is_floating_point() else t).numpy()
    return out


def export_onnx(model: nn.Module, path: PathLike, example_input: Any, *, opset: int = 17,
                int4: bool = False, input_name: str = "input", output_name: str = "logits"
                ) -> dict:
    """Export a fake-quant model to ONNX with QuantizeLinear/DequantizeLinear nodes.

    Args:
        model: a quantized model (calibrated activation quantizers, baked AdaRound).
        path: output ``.onnx`` file, written atomically (a hidden temporary file in its folder,
            then a rename; missing folders are created).
        example_input: one batch: a tensor, a tuple of positional tensors or a dict of keyword
            tensors (the graph's inputs are then named after the keys); its batch dimension is
            exported as dynamic, and the sequence dimension of 2-D integer inputs.
        opset: ONNX opset (≥ 13 for per-channel DequantizeLinear; 21 for INT4 / 16-bit).
        int4: store ≤ 4-bit weight codes as INT4/UINT4 initialisers (needs opset ≥ 21).

    Returns:
        ``{"path", "bytes", "opset", "qdq_nodes": {"QuantizeLinear": n, "DequantizeLinear": n},
        "int4_initialisers": n, "seconds"}``.
    """
    import onnx

    if opset < 13:
        raise ValueError(f"opset {opset} is too old: per-channel DequantizeLinear needs >= 13")
    if int4 and opset < 21:
        raise ValueError(f"int4=True needs opset >= 21 (INT4 QDQ types), got opset={opset}")
    t0 = time.perf_counter()
    twin = _onnx_twin(model, opset)
    buf = io.BytesIO()
    # The TorchScript exporter writes opsets <= 20; the ops it emits here (Conv, Gemm, QDQ, ...)
    # have the same semantics at 21, where only the QDQ types widen (INT4), so the graph is
    # exported at min(opset, 20) and then stamped with the requested opset.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args, names, axes = _onnx_inputs(example_input, input_name)
        torch.onnx.export(twin, args, buf, dynamo=False,
                          opset_version=min(opset, _LEGACY_MAX_OPSET), do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=names, output_names=[output_name],
                          dynamic_axes={**axes, output_name: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    _to_initialisers(proto, int4)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:  # the old file or the new one, never a partial one
        onnx.save(proto, str(tmp))
    counts = {op: sum(n.op_type == op for n in proto.graph.node)
              for op in ("QuantizeLinear", "DequantizeLinear")}
    n4 = sum(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
             for t in proto.graph.initializer)
    return {"path": str(path), "bytes": os.path.getsize(path), "opset": opset,
            "qdq_nodes": counts, "int4_initialisers": n4,
            "seconds": time.perf_counter() - t0}


@stage("ONNX check")
@torch.no_grad()
def check_onnx(path: PathLike, model: nn.Module, data: Any, *, limit: Optional[int] = None,
               batch_size: int = 256, progress: bool = False, optimize: bool = True) -> dict:
    """Run an exported ONNX file in onnxruntime against the PyTorch fake-quant `model`.

    Args:
        data: inputs of any form (a tensor, a dict of tensors, ...), an (inputs, labels) pair
            or a Dataset (items `x` or `(x, y)`).
        limit: use the first `limit` samples (default: all).
        optimize: let onnxruntime fuse the QDQ pattern into its integer kernels (QLinearConv
            etc., as deployed; their requantization rounds differently from fp32 fake quant).
            False runs the graph op by op (float conv between QDQ pairs), which isolates the
            export itself from the integer kernels' rounding.

    Returns:
        ``{"n", "max_abs_diff", "mean_abs_diff", "top1_agreement" (% of samples, or of
        positions for per-position logits), "seconds"}``.
    """
    import onnxruntime as ort
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, min(2, os.cpu_count() or 1))
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = model.eval()
    device = next(model.parameters()).device
    n = agree = positions = 0
    max_diff, sum_diff, numel = 0.0, 0.0, 0
    for x in tqdm(iter_batches(data, batch_size, limit), disable=not progress, desc="onnx check",
                  leave=False):
        ref = main_output(call_model(model, to_device(x, device))).float().cpu()
        out = torch.from_numpy(sess.run(None, _feeds(sess, x))[0])
        diff = (out - ref).abs()
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        numel += diff.numel()
        same = out.argmax(-1) == ref.argmax(-1)  # per sample, or per position of (N, T, C)
        agree += int(same.sum())
        positions += same.numel()
        n += num_rows(x)
    return {"n": n, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / max(numel, 1),
            "top1_agreement": 100.0 * agree / max(positions, 1), "seconds": time.perf_counter() - t0}
