"""The whole flow as a library: profile → allocate → PTQ or QAT → evaluate → export.

>>> from ompq import data, zoo
>>> from ompq.pipeline import PipelineConfig, run_pipeline, write_outputs
>>> model = zoo.load("resnet20")
>>> res = run_pipeline(model, data.fashion_mnist("train"), data.fashion_mnist("test"),
...                    PipelineConfig(avg_bits=3, uniform=True))
>>> res.record("ompq")["top1"], res.record("uniform")["size_mb"]
>>> write_outputs("runs/r20", res, onnx_data=data.fashion_mnist("test"))

`run_pipeline` profiles the model, allocates weight bits under the budget (or takes a given
BitConfig), evaluates the FP32 model, then quantizes and evaluates the best uniform width that
fits the same budget (`uniform=True`) and the ompq allocation, in that order. Every record has
``method`` ("fp32", "uniform", "ompq"), ``size_mb`` (MiB of weights), ``bops_g`` (GBOPs per
sample), ``top1`` (%), ``w_bits``/``a_bits`` (layer → bits; None for FP32) and ``seconds``
(stage → s). Sizes and BOPs come from `ompq.bitconfig.CostModel`. `ompq quantize` and
`ompq demo` are thin command lines over this module.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from .bitconfig import (BitConfig, CostModel, as_bit_config, check_avg_bits, check_bits,
                        check_budget, check_width)
from .ptq import PTQConfig
from .qat import QATConfig
from .quantize import with_options
from .stages import stage

MODES = ("ptq", "qat")
#: Candidate weight widths per mode (SPEC §4: the reference searches 2–4 bits for PTQ).
DEFAULT_BITS = {"ptq": (2, 3, 4), "qat": (2, 3, 4, 5, 6, 8)}
#: Modules the ONNX step of `write_outputs` needs.
ONNX_MODULES = ("onnx", "onnxruntime")


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of `run_pipeline`.

    Budget (at most one of `size_mb` / `avg_bits`, optionally with `bops_g`; none when a
    `bit_config` is given): `size_mb` MiB of quantized weights; `avg_bits` bits per weight on
    average (size budget `avg_bits · weights / 8 / 2**20` MiB); `bops_g` GBOPs per sample.
    `mode`: "ptq" or "qat"; `bits`: candidate weight widths (None: 2,3,4 for PTQ, 2,3,4,5,6,8
    for QAT), `act_bits`: activation bits, both in 2..16; `profile_samples`: samples of the
    ORM/distortion forward; `eval_limit`: evaluate on the first N test samples (None: all);
    `uniform`: also quantize the best uniform width that fits the budget; `seed`, `progress`
    and `act_bits` override those of `ptq` (a `PTQConfig`) and `qat` (a `QATConfig`).
    """

    mode: str = "ptq"
    size_mb: Optional[float] = None
    bops_g: Optional[float] = None
    avg_bits: Optional[float] = None
    bits: Optional[tuple[int, ...]] = None
    act_bits: int = 8
    profile_samples: int = 64
    eval_limit: Optional[int] = None
    uniform: bool = False
    seed: int = 0
    progress: bool = True
    ptq: PTQConfig = field(default_factory=PTQConfig)
    qat: QATConfig = field(default_factory=QATConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: valid modes are {', '.join(MODES)}")
        for name in ("size_mb", "bops_g"):
            if getattr(self, name) is not None:
                check_budget(getattr(self, name), name)
        if self.avg_bits is not None:
            if self.size_mb is not None:
                raise ValueError(f"give size_mb ({self.size_mb}) or avg_bits ({self.avg_bits}), "
                                 "not both")
            check_avg_bits(self.avg_bits)
        bits = DEFAULT_BITS[self.mode] if self.bits is None else self.bits
        object.__setattr__(self, "bits", check_bits(bits, "bits"))
        check_width(self.act_bits, "act_bits")
        if self.eval_limit is not None and not self.eval_limit > 0:
            raise ValueError(f"eval_limit {self.eval_limit!r}: must be positive (None: all)")


@dataclass
class PipelineResult:
    """What `run_pipeline` returns.

    `profile`: the Profile; `bit_config`: the ompq allocation (or the given config, completed);
    `models` / `configs`: method ("uniform", "ompq") → quantized model (eval mode) / the
    BitConfig it was quantized to; `results`: records fp32, [uniform], ompq (see the module
    docstring); `size_budget_mb` (MiB) / `bops_budget_g` (GBOPs): the budgets used (None: not
    set); `quant_stats`: method → `PTQResult.stats()` / `QATResult.stats()`.
    """

    mode: str
    profile: Any
    bit_config: BitConfig
    models: dict[str, nn.Module]
    configs: dict[str, BitConfig]
    results: list[dict]
    size_budget_mb: Optional[float]
    bops_budget_g: Optional[float]
    quant_stats: dict[str, dict]

    def record(self, method: str) -> dict:
        """The result record of `method` ("fp32", "uniform" or "ompq")."""
        for rec in self.results:
            if rec["method"] == method:
                return rec
        raise ValueError(f"no result for method {method!r}; have "
                         f"{', '.join(r['method'] for r in self.results)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: mode, budgets, the ompq BitConfig, the records, quant stats."""
        return {"mode": self.mode, "size_budget_mb": self.size_budget_mb,
                "bops_budget_g": self.bops_budget_g, "bit_config": self.bit_config.to_dict(),
                "results": self.results, "quant_stats": self.quant_stats}


def fp32_record(prof: Any, top1: float, seconds: Mapping[str, float]) -> dict:
    """Result record of the float model: 32-bit weights and activations, size in MiB, GBOPs."""
    cost = CostModel.from_layers(prof.layers)
    return {"method": "fp32", "size_mb": cost.fp32_size_mb(), "bops_g": cost.fp32_bops_g(),
            "top1": top1, "w_bits": None, "a_bits": None, "seconds": dict(seconds)}


def quant_record(method: str, cfg: BitConfig, top1: float,
                 seconds: Mapping[str, float]) -> dict:
    """Result record of a model quantized to `cfg` (size MiB, GBOPs, top-1 %, bits per layer)."""
    return {"method": method, "size_mb": cfg.size_mb, "bops_g": cfg.bops_g, "top1": top1,
            "w_bits": dict(cfg.weight_bits), "a_bits": dict(cfg.act_bits),
            "seconds": dict(seconds)}


def uniform_config(prof: Any, *, size_mb: Optional[float], bops_g: Optional[float],
                   bits: Sequence[int], act_bits: int) -> BitConfig:
    """The highest uniform weight width in `bits` that fits `size_mb` (MiB) and `bops_g`
    (GBOPs), as a BitConfig allocated by the ILP with that single candidate width."""
    from .allocate import InfeasibleBudgetError, allocate

    cost = CostModel.from_layers(prof.layers)
    fits = [b for b in sorted(set(bits))
            if (size_mb is None or cost.size_mb(b) <= size_mb * (1 + 1e-9))
            and (bops_g is None or cost.bops_g(b, act_bits) <= bops_g * (1 + 1e-9))]
    if not fits:
        raise InfeasibleBudgetError(
            f"no uniform width in {sorted(set(bits))} fits size_mb={size_mb} / bops_g={bops_g}; "
            f"the smallest ({min(bits)} bits) needs {cost.size_mb(min(bits)):.4f} MiB and "
            f"{cost.bops_g(min(bits), act_bits):.4f} GBOPs")
    cfg = allocate(prof, size_mb=size_mb, bops_g=bops_g, bits=(max(fits),), act_bits=act_bits)
    cfg.proxy = "uniform"
    return cfg


def quantize_model(model: nn.Module, bit_config: BitConfig, train: Any,
                   config: PipelineConfig) -> tuple[nn.Module, dict]:
    """PTQ or QAT (`config.mode`) of `model` (not modified) to `bit_config`; returns the
    quantized model in eval mode and its statistics."""
    shared = {"seed": config.seed, "progress": config.progress, "act_bits": config.act_bits}
    if config.mode == "ptq":
        from .ptq import ptq

        res = ptq(model, bit_config, train, config.ptq, **shared)
    else:
        from .qat import qat

        res = qat(model, bit_config, train, config.qat, **shared)
    return res.model.eval(), res.stats()


def _check_budget(config: PipelineConfig, bit_config: Any) -> None:
    if config.size_mb is None and config.avg_bits is None and config.bops_g is None \
            and bit_config is None:
        raise ValueError("no budget: give size_mb (MiB), avg_bits or bops_g (GBOPs), or a "
                         "bit_config")


def _size_budget(config: PipelineConfig, cost: CostModel) -> Optional[float]:
    """The size budget (MiB) of `config`: `size_mb`, or `avg_bits` turned into MiB."""
    return cost.size_mb_at(config.avg_bits) if config.avg_bits is not None else config.size_mb


def _allocation(prof: Any, config: PipelineConfig, cost: CostModel, bit_config: Any,
                size_mb: Optional[float]) -> BitConfig:
    """The ompq BitConfig: the given one (checked against the layers, size/BOPs filled in) or
    the exact allocation under the budgets."""
    if bit_config is not None:
        return cost.complete(as_bit_config(bit_config, prof.names))
    from .allocate import allocate

    return allocate(prof, size_mb=size_mb, bops_g=config.bops_g, bits=tuple(config.bits),
                    act_bits=config.act_bits, seed=config.seed)


def run_pipeline(model: nn.Module, train: Any, test: Any,
                 config: Optional[PipelineConfig] = None, *, bit_config: Any = None,
                 name: str = "model", **overrides: Any) -> PipelineResult:
    """profile → allocate → quantize → evaluate, with the FP32 (and uniform) baselines.

    Args:
        model: the FP32 model (not modified).
        train: labelled training data (profiling, calibration, QAT); test: evaluation data.
        config: a `PipelineConfig`; `**overrides` replace its fields, e.g. `avg_bits=3`.
        bit_config: quantize to this allocation instead of searching (anything
            `ompq.bitconfig.as_bit_config` accepts: a BitConfig, a dict, a JSON file).
        name: the model's description in the profile.

    Raises:
        ValueError: bad settings, no budget, an infeasible budget
            (`ompq.allocate.InfeasibleBudgetError`), layer names that do not match.
    """
    from .evaluate import evaluate
    from .profile import profile

    config = with_options(config if config is not None else PipelineConfig(), overrides)
    _check_budget(config, bit_config)
    t = time.perf_counter()
    prof = profile(model, train, num_samples=config.profile_samples, seed=config.seed,
                   progress=config.progress, description=name)
    t_prof = time.perf_counter() - t
    cost = CostModel.from_layers(prof.layers)
    size_mb, bops_g = _size_budget(config, cost), config.bops_g
    t = time.perf_counter()
    cfg = _allocation(prof, config, cost, bit_config, size_mb)
    t_alloc = time.perf_counter() - t

    def timed_eval(m: nn.Module) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = evaluate(m, test, progress=config.progress, max_samples=config.eval_limit)
        return r["top1"], time.perf_counter() - t0

    top1, t_eval = timed_eval(model)
    results = [fp32_record(prof, top1, {"eval": t_eval})]
    models: dict[str, nn.Module] = {}
    configs: dict[str, BitConfig] = {}
    stats: dict[str, dict] = {}
    for method in (("uniform",) if config.uniform else ()) + ("ompq",):
        with stage(f"{method} model"):
            t = time.perf_counter()
            c = cfg if method == "ompq" else uniform_config(
                prof, size_mb=cfg.size_mb if size_mb is None else size_mb, bops_g=bops_g,
                bits=config.bits, act_bits=config.act_bits)
            t_a = time.perf_counter() - t
            t = time.perf_counter()
            q, stats[method] = quantize_model(model, c, train, config)
            t_q = time.perf_counter() - t
            top1, t_eval = timed_eval(q)
        secs = {"profile": t_prof, "allocate": t_alloc, config.mode: t_q, "eval": t_eval} \
            if method == "ompq" else {"allocate": t_a, config.mode: t_q, "eval": t_eval}
        results.append(quant_record(method, c, top1, secs))
        models[method], configs[method] = q, c
    return PipelineResult(mode=config.mode, profile=prof, bit_config=cfg, models=models,
                          configs=configs, results=results, size_budget_mb=size_mb,
                          bops_budget_g=bops_g, quant_stats=stats)


def missing_modules(modules: Sequence[str] = ONNX_MODULES) -> list[str]:
    """The names in `modules` that cannot be imported (checked without importing them)."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def write_outputs(out_dir: Union[str, Path], result: PipelineResult, *, onnx_data: Any = None,
                  onnx_check_limit: Optional[int] = 1000, sweep: Sequence[Mapping] = (),
                  progress: bool = False) -> dict:
    """Write the report folder of `result` into `out_dir`: profile.json, bit_config.json,
    bits_per_layer.json, hawq_bit_config.json, model.ompq (the ompq model, bit-packed),
    report.json/.md and figures, export.json; with `onnx_data` (labelled data) also model.onnx
    and its onnxruntime check on the first `onnx_check_limit` samples. `sweep`: records of
    `ompq.frontier.frontier` for the report. Returns the export facts (also in export.json;
    file names relative to `out_dir`)."""
    from .bitconfig import to_hawq_bit_config, write_layer_json
    from .checkpoint import write_text_atomic
    from .packed import save_packed
    from .report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prof, cfg = result.profile, result.bit_config
    q, qcfg = result.models["ompq"], result.configs["ompq"]
    prof.to_json(out / "profile.json")
    cfg.to_json(out / "bit_config.json")
    write_layer_json(cfg, out / "bits_per_layer.json")
    hawq = json.dumps(to_hawq_bit_config(cfg), indent=1)
    write_text_atomic(hawq, out / "hawq_bit_config.json")
    facts: dict[str, Any] = {"packed": save_packed(q, out / "model.ompq", qcfg).to_dict()}
    facts["packed"]["path"] = "model.ompq"
    if onnx_data is not None:
        facts.update(_onnx_outputs(out / "model.onnx", q, onnx_data, onnx_check_limit, progress))
        facts["onnx"]["path"] = "model.onnx"
    paths = write_report(out, profile=prof, bit_config=cfg, results=result.results, sweep=sweep)
    facts["report"] = {k: Path(v).name for k, v in paths.items()}
    write_text_atomic(json.dumps(facts, indent=1, default=str), out / "export.json")
    return facts


def _onnx_outputs(path: Path, model: nn.Module, data: Any, limit: Optional[int],
                  progress: bool) -> dict:
    """Export `model` as ONNX QDQ to `path` and compare onnxruntime with PyTorch on `data`."""
    missing = missing_modules()
    if missing:
        raise ValueError(f"the ONNX export needs {' and '.join(missing)}: "
                         f"pip install {' '.join(ONNX_MODULES)}")
    from .data import sample_inputs
    from .onnx_export import check_onnx, export_onnx

    example = sample_inputs(data, 2, seed=0, strict=True)
    return {"onnx": export_onnx(model, path, example),
            "onnx_check": check_onnx(path, model, data, limit=limit, progress=progress)}


__all__ = ["MODES", "DEFAULT_BITS", "ONNX_MODULES", "PipelineConfig", "PipelineResult",
           "run_pipeline", "write_outputs", "uniform_config", "fp32_record", "quant_record",
           "quantize_model", "missing_modules"]
