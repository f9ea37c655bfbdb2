"""What every `ompq` command shares: argument types and options, model/data resolution, output
checks, the table printer, the JSON emitter and the error path.

Exit codes: 0 success; 2 bad input, one line ``ompq <command>: error: <message>``; 130 on
Ctrl-C and 143 on SIGTERM, one line naming the stage; 1 an internal error, one line and a
pointer to ``OMPQ_DEBUG=1`` (or `--debug`) for the traceback. Bit-widths are integers in 2..16.
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
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TextIO, Union

import torch
from torch import nn

from .. import zoo
from .._jsonio import to_jsonable
from ..bitconfig import BITS_RANGE, check_avg_bits, check_bits, check_budget, check_width
from ..pipeline import missing_modules

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
#: Data of a model outside the zoo when --data is not given (zoo models: their own dataset).
FALLBACK_DATA = "fashion-mnist"
#: Seed of the global RNG while a `module.path:factory` model is built.
FACTORY_SEED = 0
#: Samples of a `random:C,H,W` data spec.
RANDOM_SAMPLES = 256
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, RuntimeError)
MODEL_FORMS = ("a zoo name (see `ompq.zoo.list_models()`)",
               "module.path:factory (a callable returning an nn.Module, e.g. mypkg.nets:build)",
               "a saved model file (torch.save(model, PATH) or TorchScript)")
BITS_HELP = f"integers in {BITS_RANGE}"
DATA_FORMS = "fashion-mnist, imagefolder:PATH, random:C,H,W or module.path:factory"
#: pip package of a module when the names differ (`require`).
PIP_NAMES = {"PIL": "pillow"}


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


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename:
        return f"cannot use {str(err.filename)!r}: {err.strerror or err}"
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(msg.split()) or type(err).__name__


def fail(prog: str, err: BaseException) -> int:
    """Print ``<prog>: error: <message>`` as one line on stderr; return exit code 2."""
    print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
    return EXIT_USAGE


def interrupted(prog: str, err: KeyboardInterrupt) -> int:
    """Print ``<prog>: interrupted during <stage>`` (or SIGTERM's ``terminated``); 130 / 143."""
    from ..stages import stage_of

    where = stage_of(err)
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    print(f"{prog}: {what}{' during ' + where if where else ''}; nothing was left half-written",
          file=sys.stderr)
    return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED


def guard(command: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run `body` with the exit codes of the module docstring (`debug` or ``OMPQ_DEBUG=1``:
    errors raise with their traceback instead)."""
    prog = f"ompq {command}"
    debug = debug or bool(os.environ.get("OMPQ_DEBUG"))
    try:
        with _sigterm_raises():
            return body()
    except KeyboardInterrupt as err:
        return interrupted(prog, err)
    except USER_ERRORS as err:
        if debug:
            raise
        return fail(prog, err)
    except Exception as err:  # a bug: say so in one line, keep the traceback one switch away
        if debug:
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {_one_line(err)} (a bug in ompq; "
              "rerun with OMPQ_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """In the main thread, turn SIGTERM into `Terminated` for the block (previous handler
    restored after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Argument names holding input files and output files (with their flags), for `check_paths`.
INPUT_FILE_ARGS = {"profile": "--profile", "packed": "--packed", "bit_config": "--bit-config",
                   "report": "report"}
OUTPUT_FILE_ARGS = {"json": "--json", "onnx": "--onnx", "hawq": "--hawq",
                    "layer_json": "--layer-json"}


def check_paths(args: argparse.Namespace) -> None:
    """Before any work: every input file given exists, every output file can be written and is
    not an input, and a staged `--out` folder (demo, quantize) is empty or `--overwrite`."""
    from ..outputs import check_output_dir, check_output_file, verify_member

    for attr, flag in INPUT_FILE_ARGS.items():
        path = getattr(args, attr, None)
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path!r}: no such file or folder")
    if getattr(args, "packed", None):
        verify_member(args.packed)  # a packed file inside a folder of another run is refused
    inputs = [getattr(args, a, None) for a in (*INPUT_FILE_ARGS, "model")]
    inputs = [p for p in inputs if isinstance(p, str) and os.path.exists(p)]
    for attr, flag in OUTPUT_FILE_ARGS.items():
        path = getattr(args, attr, None)
        if path and path != "-":
            check_output_file(path, inputs=inputs, what=flag)
    if getattr(args, "staged_out", False) and getattr(args, "out", None):
        check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs, what="--out")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command under `guard`: paths checked first, then its `run(args)` prints
    tables (on stderr with ``--json -``, so that stdout is pure JSON) and returns its JSON
    result for `emit_json`."""
    def body() -> int:
        check_paths(args)
        with human_output(getattr(args, "json", None)):
            payload = args.func(args)
        emit_json(getattr(args, "json", None), payload)
        return 0

    return guard(args.command, body, getattr(args, "debug", False))


def add_out_dir_args(parser: argparse.ArgumentParser, default: Optional[str] = None,
                     help_text: str = "write the report folder and exports here") -> None:
    """`--out DIR` written all-or-nothing (`ompq.outputs.staged_dir`) and `--overwrite`."""
    parser.add_argument("--out", default=default, metavar="DIR",
                        help=help_text + (f" ({default})" if default else ""))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder (it is swapped in only when the "
                             "run is complete)")
    parser.set_defaults(staged_out=True)


def require(*modules: str, hint: str = "") -> None:
    """Fail fast, before any long work, when one of `modules` cannot be imported: one line
    ``<module> is not installed; pip install <pkg>`` (plus `hint`, e.g. a flag that skips the
    step), a `UsageError` (exit 2)."""
    missing = missing_modules(modules)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        pkgs = " ".join(PIP_NAMES.get(m, m) for m in missing)
        raise UsageError(f"{' and '.join(missing)} {verb} not installed; pip install {pkgs}"
                         f"{hint}")


# ============================================================================ argument types
def _type_error(what: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {what}; got {text!r}")


def _checked(check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)` (a validator of `ompq.bitconfig`); its ValueError becomes argparse's
    one-line error, so the command line says what the library says."""
    try:
        return check(*args)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(text: str, kind: type) -> Any:
    """`text` as a `kind` (int or float) when it is one, else the stripped text (which the
    validators then reject by name)."""
    try:
        return kind(text)
    except ValueError:
        return text.strip()


def _items(text: str) -> list[str]:
    return [t for t in text.split(",") if t.strip()]


def bit_width(text: str) -> int:
    """One bit-width (argparse type): `check_width`, an integer in 2..16."""
    return _checked(check_width, _number(text, int))


def bits_list(text: str) -> tuple[int, ...]:
    """Candidate widths (argparse type): ``"2,3,4,8"`` → (2, 3, 4, 8), `check_bits`."""
    return _checked(check_bits, [_number(t, int) for t in _items(text)])


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
    """Budgets (argparse type): comma-separated `check_budget` numbers (> 0, finite); several
    give a Pareto sweep."""
    values = [_checked(check_budget, _number(v, float), "") for v in _items(text)]
    if not values:
        raise _type_error("comma-separated numbers > 0", text)
    return values


def positive_float(text: str) -> float:
    """A budget (argparse type): `check_budget`, a finite number > 0 (e.g. MiB)."""
    return _checked(check_budget, _number(text, float), "")


def avg_bits(text: str) -> float:
    """Average bits per weight (argparse type): `check_avg_bits`, a number in [2, 16]."""
    return _checked(check_avg_bits, _number(text, float), "")


def positive_int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers > 0 (argparse type): ``"1,64"`` → (1, 64), in the given order."""
    values = tuple(_int_at_least(t.strip(), 1) for t in _items(text))
    if not values:
        raise _type_error("comma-separated integers >= 1", text)
    return values


def positive_int(text: str) -> int:
    """An integer > 0 (argparse type)."""
    return _int_at_least(text, 1)


def micro_batch(text: str) -> int:
    """An integer >= 4, a micro-batch size (argparse type)."""
    return _int_at_least(text, 4)


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
                        help=f"dataset: {DATA_FORMS}{extra} "
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
    parser.add_argument("--debiased", action="store_const", const=True, default=None,
                        help="unbiased HSIC (U-statistic; always on with micro-batches)")
    parser.add_argument("--batch-size", type=micro_batch, default=None, metavar="M",
                        help="micro-batches of M samples (≥ 4): memory independent of N, the "
                        "minibatch CKA estimator (default: all N at once; N / processes under "
                        "torchrun)")
    parser.add_argument("--mask", default="auto", metavar="KEY",
                        help="token mask of dict inputs: auto (their attention_mask entry, if "
                        "any), another entry's name, or none")
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
          f"samples, seed {args.seed})")  # human output: stdout, stderr with --json -
    return profile(model, data, num_samples=args.num_samples, seed=args.seed,
                   include=args.include, exclude=args.exclude, feature=args.feature,
                   debiased=args.debiased, device=args.device, progress=args.progress,
                   description=label, memory_format=args.memory_format,
                   distortion_bits=args.distortion_bits,
                   distortion_samples=args.distortion_samples, batch_size=args.batch_size,
                   mask=None if args.mask == "none" else args.mask)


# ============================================================================ models
def _model_error(spec: str, why: str) -> ValueError:
    forms = "\n  - ".join(MODEL_FORMS)
    return ValueError(f"cannot load model {spec!r}: {why}\na model is one of:\n  - {forms}"
                      f"\nzoo models: {', '.join(zoo.list_models())}")


def _import_attr(spec: str, what: str, fail: Callable[[str], Exception]) -> Any:
    """The object named by `module.path:attr.sub` (`what`: "module" or "data module"); `fail`
    turns a one-line reason into the exception to raise."""
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as err:
        raise fail(f"cannot import {what} {mod_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise fail(f"{what} {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _from_factory(spec: str) -> nn.Module:
    obj = _import_attr(spec, "module", lambda why: _model_error(spec, why))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FACTORY_SEED)  # random weights: the same in every run and process
        model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        attr = spec.partition(":")[2]
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
    or "random:C,H,W" (RANDOM_SAMPLES seeded N(0, 1) images, 10 classes: smoke tests); for
    "module.path:factory", what the factory returns (inputs with N rows such as a dict of
    `input_ids` and `attention_mask`, an (inputs, labels) pair, a Dataset, ...)."""
    if ":" in spec and not spec.startswith(("random:", "imagefolder:")):
        return _data_from_factory(spec)
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

    if spec.startswith("imagefolder:"):
        require("PIL")  # the image decoder
    try:
        ds = data.load_dataset(spec, split)
    except (OSError, ValueError) as err:
        forms = "" if "valid:" in str(err) else f"; valid: {DATA_FORMS}"
        raise ValueError(f"cannot read data {spec!r} (split {split!r}): {err}{forms}") from None
    if len(ds) == 0:
        raise ValueError(f"data {spec!r} (split {split!r}) has no samples")
    return ds


def _data_from_factory(spec: str) -> Any:
    obj = _import_attr(spec, "data module",
                       lambda why: ValueError(f"{why}; valid data: {DATA_FORMS}"))
    return obj() if callable(obj) and not isinstance(obj, torch.utils.data.Dataset) else obj


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
    from ..checkpoint import write_text_atomic

    write_text_atomic(text + "\n", path)
    print(f"wrote {path}", file=sys.stderr)
