"""Report folders: `report.json` (versioned), matplotlib figures and a Markdown summary.

Figures: ORM heat map, bits beside importance or NSR, accuracy against size (`pareto.png`), all
drawn on `matplotlib.figure.Figure` at a fixed size. Folder contents: docs/DESIGN.md,
"Report folder".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

from ._jsonio import read_json, to_jsonable
from .checkpoint import atomic_path, write_text_atomic
from .stages import stage

REPORT_FORMAT = "ompq.Report"
REPORT_VERSION = 1
DPI = 100
#: (width, height) in pixels of every figure written by this module.
FIGURE_PIXELS: dict[str, tuple[int, int]] = {
    "orm_heatmap.png": (900, 800),
    "bits_importance.png": (1000, 500),
    "pareto.png": (1200, 550),
}
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- JSON helpers
def _as_json_obj(obj: Any) -> Optional[dict]:
    """Turn a Profile/BitConfig (anything with `to_json`), a JSON string, a path or a dict into
    a plain dict; None stays None."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_json"):
        return json.loads(obj.to_json())
    if isinstance(obj, (str, os.PathLike)):
        return read_json(obj)
    raise TypeError(f"cannot turn a {type(obj).__name__} into a JSON object; expected a "
                    "Profile/BitConfig, a dict, a JSON string or a path to a .json file")


def load_report(report_json: PathLike) -> dict:
    """Read a ``report.json`` and check its format and version.

    Raises ValueError naming the file when the format is not ``ompq.Report`` or the version is
    newer than this ompq understands.
    """
    path = Path(report_json)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"report file {str(path)!r} does not exist; pass a report.json written "
                         "by `ompq demo`/`ompq quantize --out DIR` or the folder holding it") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"report file {str(path)!r} is not valid JSON ({err})") from None
    if data.get("format") != REPORT_FORMAT:
        raise ValueError(f"{str(path)!r} has format {data.get('format')!r}; expected "
                         f"{REPORT_FORMAT!r}")
    if int(data.get("version", 0)) > REPORT_VERSION:
        raise ValueError(f"{str(path)!r} has version {data['version']}; this ompq reads "
                         f"version <= {REPORT_VERSION}; upgrade ompq")
    return data


# --------------------------------------------------------------------------- data extraction
def _layer_names(profile: Optional[dict], bit_config: Optional[dict]) -> list[str]:
    if profile:
        if profile.get("names"):
            return list(profile["names"])
        layers = profile.get("layers") or []
        names = [l["name"] if isinstance(l, Mapping) else str(l) for l in layers]
        if names:
            return names
    if bit_config:
        return list((bit_config.get("weight_bits") or {}).keys())
    return []


def _layer_params(profile: Optional[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in (profile or {}).get("layers") or []:
        if isinstance(layer, Mapping) and "name" in layer and "params" in layer:
            out[layer["name"]] = int(layer["params"])
    return out


def _orm(profile: Optional[dict]) -> Optional[np.ndarray]:
    if not profile or profile.get("orm") is None:
        return None
    orm = np.asarray(profile["orm"], dtype=np.float64)
    if orm.ndim != 2 or orm.shape[0] != orm.shape[1]:
        raise ValueError(f"profile ORM must be a square L×L matrix, got shape {orm.shape}")
    return orm


def _new_figure(name: str):
    w, h = FIGURE_PIXELS[name]
    return Figure(figsize=(w / DPI, h / DPI), dpi=DPI)


def _save(fig, folder: Path, name: str) -> Path:
    """Save `fig` as PNG ``folder/name`` atomically (a hidden temporary file, then a rename)."""
    path = folder / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")  # no bbox_inches: the pixel size stays fixed
    return path


def _tick_fontsize(n: int) -> float:
    return max(4.0, min(9.0, 220.0 / max(n, 1)))


# --------------------------------------------------------------------------- figures
def plot_orm_heatmap(orm: np.ndarray, names: Sequence[str], folder: PathLike) -> Path:
    """Write ``orm_heatmap.png``: the ORM matrix (values in [0, 1]) with layer names on both
    axes, in layer (execution) order."""
    fig = _new_figure("orm_heatmap.png")
    ax = fig.add_axes([0.25, 0.25, 0.6, 0.68])
    im = ax.imshow(orm, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    n = orm.shape[0]
    fs = _tick_fontsize(n)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=fs)
    ax.set_yticklabels(names, fontsize=fs)
    ax.set_title("Orthogonality metric (ORM, linear CKA) between layers")
    cax = fig.add_axes([0.87, 0.25, 0.025, 0.68])
    fig.colorbar(im, cax=cax, label="ORM")
    return _save(fig, Path(folder), "orm_heatmap.png")


def plot_bits_importance(names: Sequence[str], bits: Sequence[int],
                         importance: Optional[Sequence[float]], folder: PathLike,
                         label: str = "importance θ (normalised)", log: bool = False) -> Path:
    """Write ``bits_importance.png``: weight bits per layer (left axis) beside a per-layer value
    (right axis: the importance θ, or what `label` says, on a log scale with `log`); the right
    bars are omitted when `importance` is None."""
    fig = _new_figure("bits_importance.png")
    ax = fig.add_axes([0.07, 0.35, 0.85, 0.57])
    x = np.arange(len(names))
    width = 0.4 if importance is not None else 0.8
    ax.bar(x - (width / 2 if importance is not None else 0), bits, width, color="tab:blue",
           label="weight bits")
    ax.set_ylabel("weight bits", color="tab:blue")
    ax.set_ylim(0, max(list(bits) + [8]) + 1)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=_tick_fontsize(len(names)))
    ax.set_xlim(-0.7, len(names) - 0.3)
    if importance is not None:
        ax2 = ax.twinx()
        ax2.bar(x + width / 2, importance, width, color="tab:orange", label=label.split(" (")[0])
        ax2.set_ylabel(label, color="tab:orange")
        if log:
            ax2.set_yscale("log")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2,
                  fontsize=8, frameon=False)
    ax.set_title(f"Per-layer weight bits and {label.split(' (')[0]}", loc="left")
    return _save(fig, Path(folder), "bits_importance.png")


_STYLES = {"ompq": ("tab:red", "o"), "error": ("tab:red", "o"), "uniform": ("tab:blue", "s"),
           "hawq": ("tab:green", "^"), "orm-linear": ("tab:purple", "v"), "orm": ("tab:orange", "D"),
           "fp32": ("black", "*")}
_LABELS = {"error": "ompq default", "uniform": "uniform", "hawq": "HAWQ-trace",
           "orm-linear": "paper (orm-linear)", "orm": "ORM-weighted"}


def plot_pareto(results: Sequence[Mapping[str, Any]], folder: PathLike,
                sweep: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write ``pareto.png``: top-1 (%) against size (MiB). Each method of `sweep` is a curve over
    its budgets (labelled with its PTQ stage and images); each record of `results` is a large
    marker; FP32 is a dashed line. The right panel zooms on the points within 5 points of the
    best; the legend sits outside both, so it covers no data."""
    fig = _new_figure("pareto.png")
    axes = [fig.add_axes([0.07, 0.11, 0.3, 0.8]), fig.add_axes([0.43, 0.11, 0.3, 0.8])]
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in sweep:
        curves.setdefault(str(r.get("method", "?")), []).append(
            (float(r["size_mb"]), float(r["top1"])))
    points = [p for pts in curves.values() for p in pts]
    points += [(float(r["size_mb"]), float(r["top1"])) for r in results
               if r.get("size_mb") is not None and r.get("top1") is not None
               and r.get("method") != "fp32"]
    for k, ax in enumerate(axes):
        for method, pts in curves.items():
            color, marker = _STYLES.get(method, (None, "x"))
            pts.sort()
            stage = next((r.get("stage") for r in sweep if r.get("method") == method), "")
            n = next((r.get("n") for r in sweep if r.get("method") == method), None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, ms=5,
                    lw=1.2, alpha=0.85, label=f"{_LABELS.get(method, method)} ({stage} sweep"
                    + (f", {n} images)" if n else ")"))
        for r in results:
            if r.get("size_mb") is None or r.get("top1") is None:
                continue
            method = str(r.get("method", "?"))
            color, marker = _STYLES.get(method, (None, "^"))
            if method == "fp32":
                ax.axhline(float(r["top1"]), color="gray", ls="--", lw=1,
                           label=f"FP32 ({float(r['top1']):.2f} %)")
                continue
            ax.scatter([float(r["size_mb"])], [float(r["top1"])], s=140, color=color,
                       marker=marker, edgecolors="black", zorder=5, alpha=0.8,
                       label=f"{method}, full pipeline ({float(r['top1']):.2f} %)")
        ax.set_xlabel("size of quantized weights (MiB)")
        ax.grid(alpha=0.3)
        if k == 1 and points:
            top = max(p[1] for p in points)
            near = [p for p in points if p[1] >= top - 5]
            ax.set_ylim(min(p[1] for p in near) - 0.3, top + 0.5)
            xs = [p[0] for p in near]
            pad = 0.04 * (max(xs) - min(xs) or max(xs) or 1.0)
            ax.set_xlim(min(xs) - pad, max(xs) + pad)
            ax.set_title("zoom: within 5 points of the best")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].set_title("Accuracy against size")
    if axes[0].get_legend_handles_labels()[0]:
        axes[1].legend(*axes[0].get_legend_handles_labels(), loc="upper left",
                       bbox_to_anchor=(1.03, 1.0), fontsize=8, frameon=False)
    return _save(fig, Path(folder), "pareto.png")


# --------------------------------------------------------------------------- markdown
def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def sweep_table_rows(sweep: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the accuracy-against-size table: one row per average width, one
    column per method, cells "top-1 (size MiB)"."""
    methods = list(dict.fromkeys(str(r["method"]) for r in sweep))
    widths = sorted({float(r["avg_bits"]) for r in sweep})
    cell = {(str(r["method"]), float(r["avg_bits"])): r for r in sweep}
    rows = [[f"{w:g}"] + [f"{cell[m, w]['top1']:.2f} ({cell[m, w]['size_mb']:.4f})"
                          if (m, w) in cell else "–" for m in methods] for w in widths]
    return ["avg bits"] + [_LABELS.get(m, m) for m in methods], rows


def results_table_rows(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the results table: method, size MiB, GBOPs, top-1 % and the
    seconds of every stage that any record has."""
    stages: list[str] = []
    for r in results:
        for k in (r.get("seconds") or {}):
            if k not in stages:
                stages.append(k)
    header = ["method", "size MiB", "GBOPs", "top-1 %"] + [f"{s} s" for s in stages]
    rows = []
    for r in results:
        secs = r.get("seconds") or {}
        rows.append([str(r.get("method", "?")), _fmt(r.get("size_mb"), 4), _fmt(r.get("bops_g"), 3),
                     _fmt(r.get("top1"), 2)] + [_fmt(secs.get(s), 1) for s in stages])
    return header, rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(data: dict, pngs: Sequence[Path]) -> str:
    profile, cfg, results = data.get("profile"), data.get("bit_config"), data.get("results") or []
    parts = ["# ompq report", ""]
    model = (profile or {}).get("model")
    if model:
        parts += [f"Model: `{model}`", ""]
    if results:
        parts += ["## Results", "", _md_table(*results_table_rows(results)), ""]
    sweep = data.get("sweep") or []
    if sweep:
        parts += ["## Accuracy against size", "",
                  f"Round-to-nearest PTQ, top-1 % on {sweep[0].get('n')} test images, per "
                  "average weight width (size MiB in brackets).", "",
                  _md_table(*sweep_table_rows(sweep)), ""]
    if cfg:
        budget = cfg.get("budget") or {}
        parts += ["## Bit allocation", "",
                  f"Proxy `{cfg.get('proxy')}`, method `{cfg.get('method')}`, status "
                  f"`{cfg.get('status')}`; size {_fmt(cfg.get('size_mb'), 4)} MiB, "
                  f"{_fmt(cfg.get('bops_g'), 3)} GBOPs (budget: size "
                  f"{_fmt(budget.get('size_mb'), 4)} MiB, BOPs {_fmt(budget.get('bops_g'), 3)} G); "
                  f"search {_fmt(cfg.get('search_seconds'), 3)} s.", ""]
        params = _layer_params(profile)
        names = _layer_names(profile, cfg)
        wb, ab, imp = cfg.get("weight_bits") or {}, cfg.get("act_bits") or {}, cfg.get("importance") or {}
        rows = [[n, str(params.get(n, "–")), str(wb.get(n, "–")), str(ab.get(n, "–")),
                 _fmt(imp.get(n), 4)] for n in names]
        parts += [_md_table(["layer", "params", "w bits", "a bits", "importance"], rows), ""]
    if pngs:
        parts += ["## Figures", ""]
        parts += [f"![{p.stem}]({p.name})" for p in pngs]
        parts.append("")
    return "\n".join(parts)


# --------------------------------------------------------------------------- public API
def _chosen_distortion(profile: Optional[dict], weight_bits: Mapping[str, int],
                       order: Sequence[str]) -> Optional[list[float]]:
    """Each layer's output NSR at its chosen width, from the profile's distortion table (None
    when the profile has no table or lacks a layer or width)."""
    table = (profile or {}).get("distortion")
    if not table:
        return None
    bits, rows = list(table.get("bits") or []), table.get("output") or {}
    try:
        return [max(float(rows[n][bits.index(int(weight_bits[n]))]), 1e-12) for n in order]
    except (KeyError, ValueError, IndexError):
        return None


def _figures(data: dict, folder: Path) -> list[Path]:
    profile, cfg, results = data.get("profile"), data.get("bit_config"), data.get("results") or []
    names = _layer_names(profile, cfg)
    pngs: list[Path] = []
    orm = _orm(profile)
    if orm is not None:
        if len(names) != orm.shape[0]:
            names = [str(i) for i in range(orm.shape[0])]
        pngs.append(plot_orm_heatmap(orm, names, folder))
    if cfg and cfg.get("weight_bits"):
        wb = cfg["weight_bits"]
        order = [n for n in names if n in wb] + [n for n in wb if n not in names]
        imp = cfg.get("importance") or {}
        importance = [float(imp.get(n, 0.0)) for n in order] if imp else None
        nsr = _chosen_distortion(profile, wb, order)
        if nsr is not None and (importance is None or len(set(importance)) == 1):
            # θ ≡ 1 (the default objective): show what decided the bits instead
            pngs.append(plot_bits_importance(order, [int(wb[n]) for n in order], nsr, folder,
                                             label="output NSR at the chosen width (log)",
                                             log=True))
        else:
            pngs.append(plot_bits_importance(order, [int(wb[n]) for n in order], importance,
                                             folder))
    if results or data.get("sweep"):
        pngs.append(plot_pareto(results, folder, data.get("sweep") or ()))
    return pngs


@stage("report")
def write_report(folder: PathLike, *, profile: Any = None, bit_config: Any = None,
                 results: Sequence[Mapping[str, Any]] = (),
                 sweep: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """Write a report folder: ``report.json``, the PNG figures and ``report.md``.

    `profile` / `bit_config`: a Profile / BitConfig (or their JSON dicts, strings or paths), or
    None. `results`: records with ``method``, ``size_mb`` (MiB), ``bops_g`` (GBOPs), ``top1`` (%)
    and optional ``seconds`` (dict stage -> s). `sweep`: accuracy-against-size records of
    `ompq.frontier.frontier`. Returns ``{"report.json": path, "<fig>.png": path,
    ..., "report.md": path}``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise TypeError(f"results[{i}] is a {type(r).__name__}; expected a dict with "
                            "method, size_mb, bops_g and top1")
    data = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
            "profile": to_jsonable(_as_json_obj(profile)),
            "bit_config": to_jsonable(_as_json_obj(bit_config)),
            "results": to_jsonable([dict(r) for r in results]),
            "sweep": to_jsonable([dict(r) for r in sweep])}
    json_path = out / "report.json"
    write_text_atomic(json.dumps(data, indent=1), json_path)
    pngs, md = render_report(json_path)
    paths = {"report.json": json_path}
    paths.update({p.name: p for p in pngs})
    paths["report.md"] = md
    return paths


def render_report(report_json: PathLike, out_dir: Optional[PathLike] = None
                  ) -> tuple[list[Path], Path]:
    """Draw the figures and the Markdown summary of a ``report.json`` (or the folder holding
    it) into `out_dir` (default: the report's folder). Returns (png paths, markdown path)."""
    path = Path(report_json)
    if path.is_dir():
        path = path / "report.json"
    data = load_report(path)
    folder = Path(out_dir) if out_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    pngs = _figures(data, folder)
    md = folder / "report.md"
    write_text_atomic(_markdown(data, pngs), md)
    return pngs, md
