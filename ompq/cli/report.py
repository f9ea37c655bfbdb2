"""`ompq report`: turn a report.json into its figures and a Markdown summary."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_common_args, print_results, require


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="draw the figures and Markdown summary of a report.json",
        description="Render a report.json (written by `ompq demo` / `ompq quantize --out`) "
                    "into PNG figures (ORM heat map, bits vs importance, accuracy-vs-size "
                    "Pareto curve) and report.md.")
    p.add_argument("report", help="report.json or the folder holding it")
    p.add_argument("--out", default=None, help="output folder (default: the report's folder)")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    """Render, print the results table and the written paths; the JSON result lists them."""
    from ..outputs import refresh_manifest, verify_dir
    require("matplotlib")
    from ..report import load_report, render_report

    folder = Path(args.report) if Path(args.report).is_dir() else Path(args.report).parent
    verify_dir(folder)  # refuses a folder that mixes two runs
    data = load_report(args.report)
    pngs, md = render_report(args.report, args.out)
    if args.out is None:
        refresh_manifest(folder)  # the redrawn figures belong to the same run
    if data.get("results"):
        print_results(data["results"])
    for p in pngs:
        print(f"figure: {p}")
    print(f"summary: {md}")
    return {"command": "report", "figures": [str(p) for p in pngs], "markdown": str(md),
            "results": data.get("results") or []}
