"""Choose the default allocation objective on held-out *training* images, before the study.

Round-to-nearest PTQ (MSE weight scales, EMA activation ranges, no reconstruction) of each zoo
model at a few average widths, for every candidate objective, evaluated on the last
`--val` images of the Fashion-MNIST training split (the study itself reports the test split,
so the choice is not fitted to the numbers it is judged by). Calibration draws from the whole
training split (overlap with the validation images is negligible: 256 of 60 000).

Usage:  python benchmarks/objective_selection.py [--models resnet20 mobilenetv2]
Writes benchmarks/results/objective_selection.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ompq import zoo  # noqa: E402
from ompq.checkpoint import write_text_atomic  # noqa: E402
from ompq.allocate import allocate  # noqa: E402
from ompq.bitconfig import CostModel  # noqa: E402
from ompq.data import fashion_mnist  # noqa: E402
from ompq.evaluate import evaluate  # noqa: E402
from ompq.profile import profile  # noqa: E402
from ompq.ptq import ptq  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)
#: name -> allocate keyword arguments
CANDIDATES = {
    "error/output": dict(proxy="error", distortion="output"),
    "error/weight": dict(proxy="error", distortion="weight"),
    "orm/output b=1": dict(proxy="orm", distortion="output", beta=1.0),
    "orm/output b=3": dict(proxy="orm", distortion="output", beta=3.0),
    "orm/weight b=1": dict(proxy="orm", distortion="weight", beta=1.0),
    "orm/weight b=3": dict(proxy="orm", distortion="weight", beta=3.0),
    "orm-linear": dict(proxy="orm-linear"),
    "uniform": dict(proxy="uniform"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    p.add_argument("--avg-bits", nargs="+", type=float, default=[2.5, 3.0])
    p.add_argument("--val", type=int, default=5000, help="held-out training images evaluated")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/objective_selection.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train = fashion_mnist("train")
    x, y = train.tensors
    val = (x[-a.val:], y[-a.val:])
    doc = {"format": "ompq.ObjectiveSelection", "version": 1, "settings": vars(a),
           "machine": {"platform": platform.platform(), "torch": torch.__version__},
           "records": []}
    for name in a.models:
        model = zoo.load(name)
        prof = profile(model, train, num_samples=64, seed=0, progress=False)
        cost = CostModel.from_layers(prof.layers)
        for ab in a.avg_bits:
            size = cost.size_mb_at(ab)
            for label, kw in CANDIDATES.items():
                cfg = allocate(prof, size_mb=size, bits=BITS, **kw)
                t0 = time.perf_counter()
                q = ptq(model, cfg, train, num_samples=a.calib, iters=0, act_iters=0, seed=0,
                        progress=False).model
                r = evaluate(q, val, progress=False)
                doc["records"].append({"model": name, "avg_bits": ab, "objective": label,
                                       "size_mb": cfg.size_mb, "bits": cfg.weight_bits,
                                       "top1": r["top1"], "n": r["n"],
                                       "seconds": time.perf_counter() - t0})
                print(f"[{name}] {ab:g} bits {label:16s} top1 {r['top1']:.2f}", flush=True)
    write_text_atomic(json.dumps(doc, indent=1), a.out)
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    cols = sorted({(r["model"], r["avg_bits"]) for r in doc["records"]})
    lines = ["| objective | " + " | ".join(f"{m} {b:g} bits" for m, b in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label in CANDIDATES:
        cells = []
        for m, b in cols:
            hit = [r for r in doc["records"] if (r["model"], r["avg_bits"], r["objective"])
                   == (m, b, label)]
            cells.append(f"{hit[0]['top1']:.2f}" if hit else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
