"""GPU benchmark of ompq's kernels: achieved memory bandwidth of fake quantization and the speed of
`centered_gram`, against torch's built-ins, on one CUDA device.

Fake quantization streams memory, so the table gives each op's effective bandwidth (bytes it must
read and write ÷ time) as a share of the card's nominal bandwidth (2 × memory clock × bus width,
from the device properties) and of a device-to-device `x.clone()` in the same run. Issue 3's
target: fake quant at ≥ 70 % of the card's memory bandwidth. The tensors are the CPU benchmark's
weights (512×512×3×3, per channel, 4 bits; 9.4 MB, cache-resident on large GPUs) and
activations (64×64×56×56, per tensor, 8 bits; 51 MB), plus 256×64×56×56 activations (205 MB,
well past any L2) per tensor and per channel (axis 1), where the bandwidth figure is meaningful.

The Gram tables time `centered_gram` against centring plus `xc @ xc.T`, then its two CUDA
implementations at large D (N×D = 64×200 000, 256×200 000, 64×1 000 000; fp32 and bf16; post-ReLU
and mean-1000 features): the tiled kernel (`OMPQ_CUDA_GRAM=tiled`), the cuBLAS path
(`centered_gram_mm`), `centered_gram`'s own choice and a plain uncentred `torch.mm` (the target:
the Gram at least as fast as that product), each with its error against an fp64 Gram.

Each case runs `--reps` times between two CUDA events; cases interleave (A B C … A B C …) for
`--rounds` rounds and the table quotes medians. `--device cpu` runs the same code with wall-clock
timing (a dry run of the script; the bandwidth columns then mean little).

Run:  python benchmarks/bench_cuda.py [--rounds 11] [--reps 20] [--json benchmarks/results/cuda.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

from ompq import ops
from _results import write_json  # benchmarks/_results.py: this folder is on sys.path
from bench_gram import fp64_gram, rel_err, torch_gram

Case = Callable[[], object]


def nominal_bandwidth_gbs(device: torch.device) -> float | None:
    """The card's nominal memory bandwidth in GB/s (None on CPU or when torch does not say)."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    clock_khz = getattr(p, "memory_clock_rate", 0)
    bus_bits = getattr(p, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        try:  # older torch does not expose these; CuPy reads the same CUDA device attributes
            import cupy  # type: ignore[import-not-found]
            props = cupy.cuda.runtime.getDeviceProperties(device.index or 0)
            clock_khz, bus_bits = props["memoryClockRate"], props["memoryBusWidth"]
        except Exception:  # noqa: BLE001  (no CuPy, or it cannot read the device)
            return None
    return 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9


def time_case(fn: Case, reps: int, device: torch.device) -> float:
    """Seconds per call of fn, averaged over `reps` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def interleaved(cases: dict[str, Case], rounds: int, reps: int,
                device: torch.device) -> dict[str, float]:
    """Median seconds per call of every case over `rounds` interleaved rounds (one warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds + 1):
        for name, fn in cases.items():
            t = time_case(fn, reps, device)
            if r > 0:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def _fwd_bwd(fn: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor,
             *params: torch.Tensor, update: bool = False) -> Case:
    """One training-like step: leaf tensors made once, their grads reset (set to None) per call.

    Without `update` the parameters stay unchanged between calls, so ompq's forward finds them
    validated and does not sync. With `update` each call first changes them in place (`add_(0)`,
    as an optimizer step would), so ompq's forward re-checks their values: one sync per call."""
    xr = x.detach().requires_grad_()
    ps = [p.detach().requires_grad_() for p in params]

    def run() -> None:
        for t in (xr, *ps):
            t.grad = None
        if update:
            with torch.no_grad():
                for p in ps:
                    p.add_(0)
        fn(xr, *ps).backward(g)
    return run


def fake_quant_cases(x: torch.Tensor, axis: int | None, qmin: int, qmax: int
                     ) -> tuple[dict[str, Case], dict[str, int]]:
    """Cases on tensor x and the bytes each must move (reads + writes of full tensors)."""
    gen = torch.Generator(device=x.device).manual_seed(1)
    g = torch.randn(x.shape, generator=gen, device=x.device)
    if axis is None:
        s = (x.abs().amax() / qmax).reshape(1)
        z = torch.zeros(1, device=x.device)
        sf = float(s)  # outside the timed call: float() of a CUDA tensor syncs
        t_fwd = lambda a: torch.fake_quantize_per_tensor_affine(a, sf, 0, qmin, qmax)  # noqa: E731
        t_lsq = lambda a, b, c: torch._fake_quantize_learnable_per_tensor_affine(  # noqa: E731
            a, b, c, qmin, qmax, 1.0)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        s = (x.abs().amax(dim=dims) / qmax).contiguous()
        z = torch.zeros_like(s)
        zi = z.to(torch.int32)
        t_fwd = lambda a: torch.fake_quantize_per_channel_affine(a, s, zi, axis, qmin, qmax)  # noqa: E731
        t_lsq = lambda a, b, c: torch._fake_quantize_learnable_per_channel_affine(  # noqa: E731
            a, b, c, axis, qmin, qmax, 1.0)
    fq = lambda a: ops.fake_quant(a, s, z, qmin, qmax, axis)  # noqa: E731
    lsq = lambda a, b, c: ops.lsq_fake_quant(a, b, c, qmin, qmax, axis)  # noqa: E731
    # name: (case, full-tensor passes it must make: 2 for a forward, 3 for a backward op, 5 for
    # forward + backward)
    spec: dict[str, tuple[Case, int]] = {
        "clone": (lambda: x.clone(), 2),
        "ompq fake_quant fwd": (lambda: fq(x), 2),
        "torch fwd": (lambda: t_fwd(x), 2),
        "ompq fake_quant_backward op": (lambda: torch.ops.ompq.fake_quant_backward(
            g, x, s, z, qmin, qmax, axis), 3),
        "ompq lsq_fake_quant_backward op": (lambda: torch.ops.ompq.lsq_fake_quant_backward(
            g, x, s, z, qmin, qmax, axis, 1.0), 3),
        "ompq fake_quant fwd+bwd": (_fwd_bwd(fq, x, g), 5),
        "torch fwd+bwd": (_fwd_bwd(t_fwd, x, g), 5),
        "ompq lsq fwd+bwd": (_fwd_bwd(lsq, x, g, s, z), 5),
        "torch learnable fwd+bwd": (_fwd_bwd(t_lsq, x, g, s, z), 5),
        "ompq lsq fwd+bwd, params updated": (_fwd_bwd(lsq, x, g, s, z, update=True), 5),
        "torch learnable, params updated": (_fwd_bwd(t_lsq, x, g, s, z, update=True), 5),
    }
    nb = x.numel() * x.element_size()
    return ({k: fn for k, (fn, _) in spec.items()},
            {k: passes * nb for k, (_, passes) in spec.items()})


def fake_quant_table(title: str, x: torch.Tensor, axis: int | None, qmin: int, qmax: int,
                     args: argparse.Namespace, peak: float | None) -> dict:
    cases, moved = fake_quant_cases(x, axis, qmin, qmax)
    med = interleaved(cases, args.rounds, args.reps, x.device)
    clone_bw = moved["clone"] / med["clone"] / 1e9
    rows = []
    print(f"\n{title}")
    print(f"{'case':36s} {'median us':>10s} {'GB/s':>8s} {'% nominal':>10s} {'% clone':>8s}")
    for name, t in med.items():
        bw = moved[name] / t / 1e9
        row = {"case": name, "median_us": t * 1e6, "gb_per_s": bw,
               "pct_of_clone": 100 * bw / clone_bw,
               "pct_of_nominal": None if peak is None else 100 * bw / peak}
        rows.append(row)
        nom = "" if peak is None else f"{row['pct_of_nominal']:.1f}"
        print(f"{name:36s} {t * 1e6:10.1f} {bw:8.1f} {nom:>10s} {row['pct_of_clone']:8.1f}")
    by = {r["case"]: r for r in rows}
    for ours, theirs in [("ompq fake_quant fwd", "torch fwd"),
                         ("ompq fake_quant fwd+bwd", "torch fwd+bwd"),
                         ("ompq lsq fwd+bwd", "torch learnable fwd+bwd"),
                         ("ompq lsq fwd+bwd, params updated", "torch learnable, params updated")]:
        by[ours]["speedup_vs_torch"] = by[theirs]["median_us"] / by[ours]["median_us"]
        print(f"  {ours} vs {theirs}: {by[ours]['speedup_vs_torch']:.2f}x")
    return {"rows": rows}


def gram_table(n: int, d: int, args: argparse.Namespace, device: torch.device) -> dict:
    """centered_gram vs `xc @ xc.T` (fp32), with errors against an fp64 Gram."""
    gen = torch.Generator(device=device).manual_seed(2)
    base = (torch.randn(n, d, generator=gen, device=device) + 3.0).relu()
    rows = []
    print(f"\ncentered_gram, N = {n}, D = {d}")
    print(f"{'dtype':6s} {'ompq us':>10s} {'torch us':>10s} {'speed-up':>9s} {'ompq err':>9s} "
          f"{'torch err':>9s}")
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = base.to(dt)
        ref = fp64_gram(x)
        med = interleaved({"ompq": lambda: ops.centered_gram(x), "torch": lambda: torch_gram(x)},
                          args.rounds, args.reps, device)
        err_o = rel_err(ops.centered_gram(x), ref)
        err_t = rel_err(torch_gram(x), ref)
        row = {"dtype": str(dt).replace("torch.", ""), "ompq_us": med["ompq"] * 1e6,
               "torch_us": med["torch"] * 1e6, "speedup": med["torch"] / med["ompq"],
               "ompq_rel_err": err_o, "torch_rel_err": err_t}
        rows.append(row)
        print(f"{row['dtype']:6s} {row['ompq_us']:10.1f} {row['torch_us']:10.1f} "
              f"{row['speedup']:8.2f}x {err_o:9.1e} {err_t:9.1e}")
    return {"n": n, "d": d, "rows": rows}


def plain_mm(x: torch.Tensor) -> torch.Tensor:
    """The bare cuBLAS product x @ x.T (uncentred) with fp32 output: the speed target."""
    if x.dtype != torch.float32:
        try:
            return torch.mm(x, x.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=) or not on this device
            return x @ x.T
    return x @ x.T


def _forced_gram(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """ops.centered_gram with its CUDA implementation forced (OMPQ_CUDA_GRAM, read per call)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        os.environ["OMPQ_CUDA_GRAM"] = path
        try:
            return ops.centered_gram(x)
        finally:
            del os.environ["OMPQ_CUDA_GRAM"]
    return run


def gram_mm_table(n: int, d: int, args: argparse.Namespace, device: torch.device) -> dict:
    """centered_gram's two CUDA paths at large D: the tiled kernel, the cuBLAS path
    (centered_gram_mm) and centered_gram's own choice, against a plain torch.mm, in fp32 and
    bf16, with errors against an fp64 Gram. Post-ReLU features (one pass of the GEMM path) and
    features with a mean of 1000 (its second, centred pass)."""
    gen = torch.Generator(device=device).manual_seed(3)
    z = torch.randn(n, d, generator=gen, device=device)
    rows = []
    print(f"\ncentered_gram paths, N = {n}, D = {d} (times in us; errors vs fp64)")
    print(f"{'data':7s} {'dtype':9s} {'tiled':>9s} {'mm':>9s} {'auto':>9s} {'torch.mm':>9s} "
          f"{'mm/torch':>9s} {'err tiled':>9s} {'err mm':>9s}")
    for data, base in (("relu", z.relu()), ("mean1e3", z + 1000.0)):
        for dt in (torch.float32, torch.bfloat16):
            x = base.to(dt)
            ref = fp64_gram(x)
            tiled, mm = _forced_gram("tiled"), ops.centered_gram_mm
            med = interleaved({"tiled": lambda: tiled(x), "mm": lambda: mm(x),
                               "auto": lambda: ops.centered_gram(x),
                               "torch.mm": lambda: plain_mm(x)}, args.rounds, args.reps, device)
            row = {"data": data, "dtype": str(dt).replace("torch.", ""),
                   **{f"{k}_us": v * 1e6 for k, v in med.items()},
                   "mm_over_torch_mm": med["mm"] / med["torch.mm"],
                   "tiled_rel_err": rel_err(tiled(x), ref), "mm_rel_err": rel_err(mm(x), ref)}
            rows.append(row)
            print(f"{data:7s} {row['dtype']:9s} {row['tiled_us']:9.1f} {row['mm_us']:9.1f} "
                  f"{row['auto_us']:9.1f} {row['torch.mm_us']:9.1f} "
                  f"{row['mm_over_torch_mm']:8.2f}x {row['tiled_rel_err']:9.1e} "
                  f"{row['mm_rel_err']:9.1e}")
            del x, ref
    return {"n": n, "d": d, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=20, help="calls timed between two events")
    ap.add_argument("--big", type=int, default=256,
                    help="batch of the large activation tensor (N×64×56×56)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "cuda.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False); "
              "use --device cpu for a dry run", file=sys.stderr)
        return 2
    if not ops.has_op("fake_quant"):
        print("bench_cuda: the compiled extension is missing: "
              "pip install --no-build-isolation -e .", file=sys.stderr)
        return 2
    peak = nominal_bandwidth_gbs(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; nominal memory bandwidth: "
          f"{'n/a' if peak is None else f'{peak:.0f} GB/s'}; torch {torch.__version__}")
    gen = torch.Generator(device=device).manual_seed(0)
    result: dict = {"format": "ompq.Benchmark", "version": 1, "benchmark": "cuda",
                    "device": name, "torch": torch.__version__, "nominal_gb_per_s": peak,
                    "rounds": args.rounds, "reps": args.reps, "fake_quant": {}}
    w = torch.randn(512, 512, 3, 3, generator=gen, device=device)
    a = torch.randn(64, 64, 56, 56, generator=gen, device=device).relu_()
    big = torch.randn(args.big, 64, 56, 56, generator=gen, device=device).relu_()
    for title, x, axis, qmin, qmax in [
        ("weights 512x512x3x3, per-channel axis 0, 4 bits", w, 0, -8, 7),
        ("activations 64x64x56x56, per-tensor, 8 bits", a, None, 0, 255),
        (f"activations {args.big}x64x56x56, per-tensor, 8 bits", big, None, 0, 255),
        (f"activations {args.big}x64x56x56, per-channel axis 1, 8 bits", big, 1, 0, 255),
    ]:
        result["fake_quant"][title] = fake_quant_table(title, x, axis, qmin, qmax, args, peak)
    del big
    result["gram"] = gram_table(64, 200_000, args, device)
    # Tiled vs cuBLAS path vs torch.mm at large D (a CPU dry run uses D / 50).
    sizes = [(64, 200_000), (256, 200_000), (64, 1_000_000)]
    if device.type != "cuda":
        sizes = [(n, d // 50) for n, d in sizes]
    result["gram_paths"] = [gram_mm_table(n, d, args, device) for n, d in sizes]
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
