"""Benchmark: micro-batched and data-parallel profiling of transformer-sized models.

Models (`ompq.zoo.transformer`, random weights, fp32 on CPU): a BERT-base-shaped encoder
(12 blocks, hidden 768, ~110 M parameters) on padded inputs (128 tokens, real lengths drawn in
64..128, attention mask) and a GPT-2-medium-shaped decoder (24 causal blocks, hidden 1024,
~355 M parameters) on full 128-token rows.

Each (model, N) runs in a fresh subprocess (so its peak RSS, `ru_maxrss`, is its own), which
times, interleaved (F P P F … with `--reps` of each; F P for `--reps 1`), medians:
  F — a plain inference forward (`torch.inference_mode`, `model(**batch)`) of the same N samples
      in the same micro-batches of `--batch-size`;
  P — `ompq.profile(model, data, num_samples=N, batch_size=...)` with the ORM only
      (`distortion_bits=None`), the headline row; with `--table`, also once the default
      profile (ORM + the distortion table the default allocation needs) at the smallest N.
Targets (issue 13): P ÷ F ≤ 1.15 at N = 64, 256, 1 024 (micro-batches of 32); peak RSS at
N = 1 024 within 1.1× of N = 64; samples per second reported.

`--dp`: a 2-process data-parallel profile (torchrun, gloo, 1 thread each) against one process
with 2 threads, same N and micro-batches (BERT shape): max |ORM difference|, all-reduce share
of the wall time (target ≤ 5 %), samples per second of each.
On a machine with CUDA, `--gpu` profiles a ~1 B-parameter decoder shape in bf16 at N = 256
(target P ÷ F ≤ 1.1).

Usage: python benchmarks/bench_profile_large.py [--models bert gpt2] [--sizes 64 256 1024]
           [--reps 2] [--batch-size 32] [--threads 2] [--dp] [--gpu] [--table]
Writes benchmarks/results/profile_large.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _results import cpu_name, write_json  # benchmarks/_results.py: this folder is on sys.path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOKENS = 128
SHAPES = {"bert": ("bert_base", True), "gpt2": ("gpt2_medium", False),
          "1b": ("decoder_1b", False), "tiny": ("tiny_encoder", True)}  # tiny: a smoke test


def _model(name: str, dtype: torch.dtype = torch.float32,
           device: str = "cpu") -> torch.nn.Module:
    from ompq.zoo import transformer as T

    torch.manual_seed(0)
    return getattr(T, SHAPES[name][0])().to(device=device, dtype=dtype).eval()


def _data(name: str, n: int, vocab: int) -> dict:
    from ompq.zoo import transformer as T

    padded = SHAPES[name][1]
    return T.tokens(n, TOKENS, vocab=vocab, seed=1, min_length=None if padded else TOKENS)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _forward(model, data: dict, n: int, batch: int, device: str) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, batch):
            model(**{k: v[s:s + batch].to(device) for k, v in data.items()})
    _sync(device)
    return time.perf_counter() - t0


def _profile(model, data: dict, n: int, batch: int, bits, device: str):
    import ompq

    t0 = time.perf_counter()
    prof = ompq.profile(model, data, num_samples=n, batch_size=batch, progress=False,
                        distortion_bits=bits, device=device)
    _sync(device)
    return time.perf_counter() - t0, prof


def worker(a: argparse.Namespace) -> None:
    """One (model, N) measurement in this process; prints one JSON line."""
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    device = "cuda" if a.gpu else "cpu"
    model = _model(a.model, dtype, device)
    data = _data(a.model, a.n, model.vocab)
    fwd, prof_t = [], []
    prof = None
    order = "FP" if a.reps == 1 else "FPPF" * (a.reps // 2)  # each kind as often first as second
    for kind in order:
        if kind == "F":
            fwd.append(_forward(model, data, a.n, a.batch_size, device))
        else:
            t, prof = _profile(model, data, a.n, a.batch_size, None, device)
            prof_t.append(t)
    row = {"model": a.model, "n": a.n, "batch_size": a.batch_size, "threads": a.threads,
           "params": sum(p.numel() for p in model.parameters()), "layers": len(prof.layers),
           "forward_s": statistics.median(fwd), "profile_s": statistics.median(prof_t),
           "profile_parts_s": {k: round(v, 3) for k, v in prof.timings.items()}}
    row["ratio"] = row["profile_s"] / row["forward_s"]
    row["samples_per_s"] = a.n / row["profile_s"]
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.table:  # after the RSS reading: the table's own memory is reported apart
        t, _ = _profile(model, data, a.n, a.batch_size, (2, 3, 4, 5, 6, 7, 8), device)
        row["profile_with_table_s"] = t
        row["peak_rss_with_table_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.gpu:
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(row), flush=True)


def _run(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def _worker_cmd(model: str, n: int, a: argparse.Namespace, table: bool = False,
                threads: int | None = None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--n", str(n),
           "--batch-size", str(a.batch_size), "--reps", str(a.reps),
           "--threads", str(threads or a.threads)]
    return cmd + (["--table"] if table else []) + (["--gpu", "--bf16"] if a.gpu else [])


DP_SCRIPT = """
import json, sys, time, torch
import torch.distributed as dist
sys.path.insert(0, {here!r})
import bench_profile_large as b
import ompq
torch.set_num_threads(1)
dist.init_process_group("gloo")
model = b._model("bert")
data = b._data("bert", {n}, model.vocab)
dist.barrier()
t0 = time.perf_counter()
prof = ompq.profile(model, data, num_samples={n}, batch_size={bs}, progress=False,
                    distortion_bits=None)
wall = time.perf_counter() - t0
if dist.get_rank() == 0:
    torch.save(prof.orm, {out!r})
    print("RESULT " + json.dumps({{"wall_s": wall, "comm_s": prof.timings["comm"]}}), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel(a: argparse.Namespace) -> dict:
    """2 processes × 1 thread against 1 process × 2 threads (BERT shape)."""
    import ompq

    n = a.dp_samples
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "dp.py")
        out = os.path.join(tmp, "orm.pt")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(DP_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__)), n=n,
                                      bs=a.batch_size, out=out))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        dp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port()), script], env)
        orm_dp = torch.load(out)
    torch.set_num_threads(2)
    model = _model("bert")
    data = _data("bert", n, model.vocab)
    t0 = time.perf_counter()
    one = ompq.profile(model, data, num_samples=n, batch_size=a.batch_size, progress=False,
                       distortion_bits=None)
    wall_one = time.perf_counter() - t0
    return {"n": n, "batch_size": a.batch_size, "max_abs_orm_diff":
            float((orm_dp - one.orm).abs().max()),
            "dp_wall_s": dp["wall_s"], "dp_comm_s": dp["comm_s"],
            "comm_share": dp["comm_s"] / dp["wall_s"], "dp_samples_per_s": n / dp["wall_s"],
            "one_process_wall_s": wall_one, "one_process_samples_per_s": n / wall_one}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["bert", "gpt2"], choices=list(SHAPES))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 1024])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=2,
                   help="forwards and profiles per measurement: 1 (F P) or even (F P P F …)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dp", action="store_true", help="also the 2-process data-parallel rows")
    p.add_argument("--dp-samples", type=int, default=128)
    p.add_argument("--dp-only", action="store_true", help="only the data-parallel rows")
    p.add_argument("--gpu", action="store_true", help="the 1 B decoder in bf16 on CUDA")
    p.add_argument("--table", action="store_true",
                   help="also time the default profile (with the distortion table) at the "
                   "smallest N")
    p.add_argument("--json", default=os.path.join(RESULTS, "profile_large.json"))
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="bert", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    models = ["1b"] if a.gpu else a.models
    sizes = [256] if a.gpu else a.sizes
    print(f"CPU: {cpu_name()}, {a.threads} threads, torch {torch.__version__}, "
          f"{TOKENS} tokens, micro-batches of {a.batch_size}")
    rows = []
    print(f"{'model':6} {'N':>5} {'forward s':>10} {'profile s':>10} {'ratio':>6} "
          f"{'samples/s':>9} {'peak RSS MiB':>12}")
    for model in [] if a.dp_only else models:
        for i, n in enumerate(sizes):
            row = _run(_worker_cmd(model, n, a, table=a.table and i == 0))
            rows.append(row)
            print(f"{model:6} {n:5d} {row['forward_s']:10.2f} {row['profile_s']:10.2f} "
                  f"{row['ratio']:6.3f} {row['samples_per_s']:9.2f} {row['peak_rss_mib']:12.0f}"
                  + (f"  (with the distortion table: {row['profile_with_table_s']:.2f} s, "
                     f"{row['profile_with_table_s'] / row['forward_s']:.2f}x)"
                     if "profile_with_table_s" in row else ""), flush=True)
        mine = [r for r in rows if r["model"] == model]
        if len(mine) > 1:
            growth = mine[-1]["peak_rss_mib"] / mine[0]["peak_rss_mib"]
            print(f"{model}: peak RSS N={mine[-1]['n']} / N={mine[0]['n']} = {growth:.3f} "
                  "(target ≤ 1.1)")
    result = {"cpu": cpu_name(), "torch": torch.__version__, "tokens": TOKENS,
              "threads": a.threads, "rows": rows}
    if a.dp or a.dp_only:
        dp = data_parallel(a)
        result["data_parallel"] = dp
        print(f"2 processes × 1 thread vs 1 process × 2 threads, BERT shape, N = {dp['n']}: "
              f"max |ORM diff| {dp['max_abs_orm_diff']:.2e}, all-reduce "
              f"{100 * dp['comm_share']:.2f} % of the wall time (target ≤ 5 %), "
              f"{dp['dp_samples_per_s']:.2f} vs {dp['one_process_samples_per_s']:.2f} samples/s")
    write_json(a.json, result)


if __name__ == "__main__":
    main()
