"""Helpers shared by the `ompq` commands: model/data resolution, tables, JSON output."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Optional, Sequence, TextIO

import torch
from torch import nn

#: Exit status of a usage error or bad input (argparse uses 2 as well).
EXIT_USAGE = 2
MODEL_FORMS = ("a zoo name (see `ompq.zoo.list_models()`)",
               "module.path:factory (a callable returning an nn.Module, e.g. mypkg.nets:build)",
               "a saved model file (torch.save(model, PATH) or TorchScript)")
DEFAULT_DATA = "fashion-mnist"
RANDOM_SAMPLES = 256


def _zoo_names() -> list[str]:
    try:
        from .. import zoo
        return list(zoo.list_models())
    except Exception:  # the zoo is optional for this message
        return []


def _model_error(spec: str, why: str) -> ValueError:
    zoo = _zoo_names()
    forms = "\n  - ".join(MODEL_FORMS)
    extra = f"\nzoo models: {', '.join(zoo)}" if zoo else ""
    return ValueError(f"cannot load model {spec!r}: {why}\na model is one of:\n  - {forms}{extra}")


def _from_factory(spec: str) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as err:
        raise _model_error(spec, f"cannot import module {mod_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _model_error(spec, f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise _model_error(spec, f"{attr!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _from_file(path: str) -> nn.Module:
    import warnings
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.endswith("/constants.pkl") for n in zf.namelist())
        if scripted:  # TorchScript archive
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(path, map_location="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _model_error(path, f"not a saved model ({err})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise _model_error(path, "the file holds a dict (a state_dict?), not a model; save the "
                           "whole model with torch.save(model, PATH) or use module.path:factory")
    raise _model_error(path, f"the file holds a {type(obj).__name__}, not an nn.Module")


def resolve_model(spec: Optional[str]) -> tuple[nn.Module, str]:
    """(model in eval mode, description) for a zoo name, `module.path:factory` or a saved file.

    `None` means the zoo's default model.
    """
    if spec is None or spec == "":
        from .. import zoo
        spec = zoo.DEFAULT_MODEL
    if os.path.isfile(spec):
        model, desc = _from_file(spec), os.path.basename(spec)
    elif ":" in spec:
        model, desc = _from_factory(spec), spec
    else:
        names = _zoo_names()
        if spec not in names:
            why = "no such file, not module.path:factory, and not a zoo model"
            raise _model_error(spec, why)
        from .. import zoo
        model, desc = zoo.load(spec), spec
    return model.eval(), desc


def resolve_data(spec: Optional[str], split: str = "test", seed: int = 0) -> Any:
    """Dataset for a data spec: "random:C,H,W" (seeded N(0,1) images, for smoke tests) or any
    spec `ompq.data.load_dataset` understands ("fashion-mnist", "imagefolder:PATH")."""
    spec = spec or DEFAULT_DATA
    if spec.startswith("random:"):
        try:
            shape = tuple(int(v) for v in spec[len("random:"):].replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"bad data spec {spec!r}; expected random:C,H,W (ints)") from None
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((RANDOM_SAMPLES, *shape), generator=gen)
        y = torch.randint(0, 10, (RANDOM_SAMPLES,), generator=gen)
        return torch.utils.data.TensorDataset(x, y)
    from .. import data
    return data.load_dataset(spec, split)


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, metavar="M",
                        help="zoo name, module.path:factory or a saved model file "
                        "(default: the embedded zoo model)")


def add_data_arg(parser: argparse.ArgumentParser, default: str = DEFAULT_DATA) -> None:
    parser.add_argument("--data", default=default, metavar="D",
                        help=f"dataset: fashion-mnist, imagefolder:PATH or random:C,H,W "
                        f"(default: {default})")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the result as JSON to PATH ('-' for stdout)")


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")


def write_json_output(text: str, path: Optional[str]) -> None:
    """Write JSON text to a file, or to stdout for '-'."""
    if path is None:
        return
    if path == "-":
        print(text)
        return
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    print(f"wrote {path}", file=sys.stderr)


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_float_list(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1000:
        return f"{v:,}"
    return str(v)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str],
                file: Optional[TextIO] = None) -> None:
    """Print an aligned text table (numbers right-aligned, text left-aligned)."""
    out = file or sys.stdout
    cells = [[_fmt(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[c], (int, float)) and not isinstance(row[c], bool)
                   for row in rows) if rows else False for c in range(len(headers))]
    widths = [max([len(h)] + [len(r[c]) for r in cells]) for c, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    print(line(list(headers)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print(line(r), file=out)
