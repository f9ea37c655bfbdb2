"""What every `ompq` command shares: argument types and options, model/data resolution, the
table printer, the JSON emitter and the error path.

Errors: a user error (ValueError, TypeError, OSError, KeyError, RuntimeError, or a bad flag)
ends the command with exit code 2 and one line ``ompq <command>: error: <message>`` on stderr
(`--debug` or ``OMPQ_DEBUG=1``: the traceback instead); Ctrl-C ends it with exit code 130 and
one line. Bit-widths on the command line are integers in 2..16, what the quantizers accept
(`ompq.quantizers.MIN_BITS`..`MAX_BITS`), for every command.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TextIO, Union

import torch
from torch import nn

from .. import zoo
from .._jsonio import to_jsonable
from ..pipeline import ONNX_MODULES, missing_modules
from ..quantizers import MAX_BITS, MIN_BITS

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Data of a model outside the zoo when --data is not given (zoo models: their own dataset).
FALLBACK_DATA = "fashion-mnist"
#: Samples of a `random:C,H,W` data spec.
RANDOM_SAMPLES = 256
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, RuntimeError)
MODEL_FORMS = ("a zoo name (see `ompq.zoo.list_models()`)",
               "module.path:factory (a callable returning an nn.Module, e.g. mypkg.nets:build)",
               "a saved model file (torch.save(model, PATH) or TorchScript)")
BITS_HELP = f"integers in {MIN_BITS}..{MAX_BITS}"


# ============================================================================ errors
class UsageError(ValueError):
    """A bad command line; `prog` is the (sub)command it belongs to, e.g. "ompq demo"."""

    def __init__(self, message: str, prog: str = "ompq") -> None:
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors raised as `UsageError` (one line, exit 2) instead of exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message, self.prog)


def fail(prog: str, err: BaseException) -> int:
    """Print ``<prog>: error: <message>`` as one line on stderr; return exit code 2."""
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    msg = " ".join(msg.split()) or type(err).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def guard(command: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run `body`: user errors → one line and exit 2 (`debug` or ``OMPQ_DEBUG=1``: raise);
    KeyboardInterrupt → one line and exit 130."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"ompq {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug or os.environ.get("OMPQ_DEBUG"):
            raise
        return fail(f"ompq {command}", err)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command under `guard`: its `run(args)` prints tables (on stderr with
    ``--json -``, so that stdout is pure JSON) and returns its JSON result for `emit_json`."""
    def body() -> int:
        with human_output(getattr(args, "json", None)):
            payload = args.func(args)
        emit_json(getattr(args, "json", None), payload)
        return 0

    return guard(args.command, body, getattr(args, "debug", False))


def require_onnx(why: str, hint: str = "") -> None:
    """Fail fast, before any long work, when onnx or onnxruntime is missing: one line saying
    `why` they are needed and ``pip install onnx onnxruntime`` (plus `hint`)."""
    missing = missing_modules(ONNX_MODULES)
    if missing:
        raise UsageError(f"{why}; it needs {' and '.join(missing)}: pip install "
                         f"{' '.join(ONNX_MODULES)}{hint}")


# ============================================================================ argument types
def _type_error(what: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {what}; got {text!r}")


def bit_width(text: str) -> int:
    """One bit-width (argparse type): an integer in 2..16."""
    try:
        b = int(text)
    except ValueError:
        raise _type_error(f"a bit-width ({BITS_HELP})", text) from None
    if not MIN_BITS <= b <= MAX_BITS:
        raise _type_error(f"a bit-width ({BITS_HELP})", text)
    return b


def bits_list(text: str) -> tuple[int, ...]:
    """Candidate widths (argparse type): ``"2,3,4,8"`` → (2, 3, 4, 8), each in 2..16."""
    what = f"comma-separated bit-widths ({BITS_HELP}, e.g. 2,3,4,5,6,8)"
    try:
        bits = tuple(sorted({int(t) for t in text.replace(" ", "").split(",") if t}))
    except ValueError:
        raise _type_error(what, text) from None
    if not bits or any(not MIN_BITS <= b <= MAX_BITS for b in bits):
        raise _type_error(what, text)
    return bits


def distortion_bits(text: str) -> Optional[tuple[int, ...]]:
    """Widths of the distortion table (argparse type): bits_list, or 'none' (no table)."""
    return None if text.strip().lower() == "none" else bits_list(text)


def pin(text: str) -> tuple[str, int]:
    """``PATTERN=BITS`` (argparse type) → (pattern, bits)."""
    name, sep, bits = text.rpartition("=")
    if not sep or not name or not bits:
        raise _type_error("PATTERN=BITS, e.g. conv1=8", text)
    return name, bit_width(bits)


def budget_list(text: str) -> list[float]:
    """Budgets (argparse type): comma-separated numbers > 0; several give a Pareto sweep."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _type_error("comma-separated numbers > 0", text) from None
    if not values or any(not v > 0 for v in values):
        raise _type_error("comma-separated numbers > 0", text)
    return values


def positive_float(text: str) -> float:
    """A number > 0 (argparse type), e.g. a size budget in MiB."""
    try:
        value = float(text)
    except ValueError:
        raise _type_error("a number > 0", text) from None
    if not value > 0:
        raise _type_error("a number > 0", text)
    return value


def avg_bits(text: str) -> float:
    """Average bits per weight (argparse type): a number in [2, 16]."""
    what = f"a number in [{MIN_BITS}, {MAX_BITS}] (e.g. 3)"
    try:
        value = float(text)
    except ValueError:
        raise _type_error(what, text) from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise _type_error(what, text)
    return value


def positive_int(text: str) -> int:
    """An integer > 0 (argparse type)."""
    return _int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _type_error(f"an integer >= {low}", text) from None
    if value < low:
        raise _type_error(f"an integer >= {low}", text)
    return value


# ============================================================================ options
def add_model_arg(parser: argparse.ArgumentParser, help_extra: str = "") -> None:
    parser.add_argument("--model", "-m", default=zoo.DEFAULT_MODEL, metavar="M",
                        help=f"zoo name, module.path:factory or a saved model file{help_extra} "
                        f"(default: {zoo.DEFAULT_MODEL})")


def add_data_arg(parser: argparse.ArgumentParser, flag: str = "--data",
                 extra: str = "") -> None:
    parser.add_argument(flag, default=None, metavar="D",
                        help=f"dataset: fashion-mnist, imagefolder:PATH or random:C,H,W{extra} "
                        f"(default: the zoo model's dataset; {FALLBACK_DATA} for other models)")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--json PATH, --no-progress and --seed, which every command takes."""
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the result as JSON to PATH ('-' for stdout)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """Options that define a profile (`ompq profile`, and `ompq allocate` without --profile)."""
    add_model_arg(parser)
    add_data_arg(parser)
    parser.add_argument("--split", default="train", help="dataset split to sample (default train)")
    parser.add_argument("--num-samples", "-n", type=positive_int, default=64,
                        help="samples N in the forward (≥ 4, default 64)")
    parser.add_argument("--include", action="append", default=None, metavar="PAT",
                        help="only layers matching this glob (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, metavar="PAT",
                        help="skip layers matching this glob (repeatable)")
    parser.add_argument("--feature", choices=("auto", "output"), default="auto",
                        help="auto: after a directly following BN/activation; output: raw output")
    parser.add_argument("--debiased", action="store_true", help="unbiased HSIC (U-statistic)")
    parser.add_argument("--device", default=None, help="device for the forward (default: model's)")
    parser.add_argument("--memory-format", choices=("auto", "channels_last", "preserve"),
                        default="auto", help="layout of the input in the forward: auto "
                        "(channels_last for 4-D inputs of conv nets; faster, same ORM), "
                        "channels_last or preserve")
    parser.add_argument("--distortion-bits", type=distortion_bits, default="2,3,4,5,6,7,8",
                        metavar="B,B,...", help="widths of the distortion table the default "
                        f"allocation needs ({BITS_HELP}; default 2..8; 'none' skips it)")
    parser.add_argument("--distortion-samples", type=positive_int, default=16,
                        help="samples behind the output distortion (default 16)")


def compute_profile(args: argparse.Namespace, model: Optional[nn.Module] = None,
                    label: Optional[str] = None, data: Any = None) -> Any:
    """`ompq.profile` for parsed profile options (model and data resolved if not given)."""
    from ..profile import profile

    if model is None:
        model, label = resolve_model(args.model)
    if data is None:
        data = resolve_data(data_spec(args.data, args.model), args.split, seed=args.seed)
    print(f"profiling {label} on {data_spec(args.data, args.model)} ({args.num_samples} "
          f"samples, seed {args.seed})", file=sys.stderr)
    return profile(model, data, num_samples=args.num_samples, seed=args.seed,
                   include=args.include, exclude=args.exclude, feature=args.feature,
                   debiased=args.debiased, device=args.device, progress=args.progress,
                   description=label, memory_format=args.memory_format,
                   distortion_bits=args.distortion_bits,
                   distortion_samples=args.distortion_samples)


# ============================================================================ models
def _model_error(spec: str, why: str) -> ValueError:
    forms = "\n  - ".join(MODEL_FORMS)
    return ValueError(f"cannot load model {spec!r}: {why}\na model is one of:\n  - {forms}"
                      f"\nzoo models: {', '.join(zoo.list_models())}")


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
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.endswith("/constants.pkl") for n in zf.namelist())
        if scripted:  # TorchScript archive
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(path, map_location="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
        raise _model_error(path, f"not a saved model ({err})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise _model_error(path, "the file holds a dict (a state_dict?), not a model; save the "
                           "whole model with torch.save(model, PATH) or use module.path:factory")
    raise _model_error(path, f"the file holds a {type(obj).__name__}, not an nn.Module")


def resolve_model(spec: Optional[str]) -> tuple[nn.Module, str]:
    """(model in eval mode, label) for a zoo name, ``module.path:factory`` or a saved file;
    None or "" is the zoo's default model. The label is the spec (a file's base name)."""
    spec = spec or zoo.DEFAULT_MODEL
    if os.path.isfile(spec):
        model, label = _from_file(spec), os.path.basename(spec)
    elif ":" in spec:
        model, label = _from_factory(spec), spec
    elif spec in zoo.list_models():
        model, label = zoo.load(spec), spec
    else:
        raise _model_error(spec, "no such file, not module.path:factory, and not a zoo model")
    return model.eval(), label


# ============================================================================ data
def data_spec(spec: Optional[str], model_spec: Optional[str] = None) -> str:
    """`spec`, or when None the dataset of the zoo model `model_spec` (`ompq.zoo.info`), else
    FALLBACK_DATA."""
    if spec:
        return spec
    name = model_spec or zoo.DEFAULT_MODEL
    if name in zoo.list_models() and not os.path.isfile(name):
        try:
            return str(zoo.info(name).get("dataset") or FALLBACK_DATA)
        except OSError:
            return FALLBACK_DATA
    return FALLBACK_DATA


def resolve_data(spec: str, split: str = "test", seed: int = 0) -> Any:
    """A Dataset of (x, y) for "fashion-mnist", "imagefolder:PATH" (`ompq.data.load_dataset`)
    or "random:C,H,W" (RANDOM_SAMPLES seeded N(0, 1) images, 10 classes: smoke tests)."""
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

    try:
        ds = data.load_dataset(spec, split)
    except (OSError, ValueError) as err:
        forms = "" if "valid:" in str(err) else \
            "; valid: fashion-mnist, imagefolder:PATH or random:C,H,W"
        raise ValueError(f"cannot read data {spec!r} (split {split!r}): {err}{forms}") from None
    if len(ds) == 0:
        raise ValueError(f"data {spec!r} (split {split!r}) has no samples")
    return ds


# ============================================================================ output
_NUMERIC = re.compile(r"[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?(?: \([-+\d.,e]+\))?|[-–]?")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1000:
        return f"{v:,}"
    return str(v)


def _is_numeric(v: Any) -> bool:
    if isinstance(v, str):
        return _NUMERIC.fullmatch(v.strip()) is not None
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str],
                file: Optional[TextIO] = None) -> None:
    """Print an aligned text table: numeric columns (numbers, or strings such as "0.0968",
    "12,345", "–") right-aligned, text columns left-aligned; floats with 4 significant digits."""
    out = file or sys.stdout
    cells = [[_fmt(v) for v in row] for row in rows]
    numeric = [bool(rows) and all(_is_numeric(row[c]) for row in rows)
               for c in range(len(headers))]
    widths = [max([len(h)] + [len(r[c]) for r in cells]) for c, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    print(line(list(headers)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print(line(r), file=out)


def print_results(results: Sequence[Mapping[str, Any]]) -> None:
    """The results table: method, size MiB, GBOPs, top-1 % and seconds per stage."""
    from ..report import results_table_rows

    header, rows = results_table_rows(results)
    print_table(rows, header)


@contextlib.contextmanager
def human_output(json_path: Optional[str]) -> Iterator[None]:
    """Send printed tables to stderr while JSON goes to stdout (``--json -``)."""
    if json_path == "-":
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def emit_json(path: Optional[str], payload: Union[str, Mapping[str, Any], Sequence, None]
              ) -> None:
    """Write `payload` (JSON text, or a dict/list made serialisable by `to_jsonable`) to
    `path`, creating its folder; ``-`` is stdout; None writes nothing."""
    if not path or payload is None:
        return
    text = payload if isinstance(payload, str) else \
        json.dumps(to_jsonable(payload), indent=1)
    if path == "-":
        print(text)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
