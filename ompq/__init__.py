"""ompq: fast, model-agnostic mixed-precision quantization (OMPQ: orthogonality + ILP).

Public API (see README.md and docs/DESIGN.md)::

    import ompq
    model = ompq.zoo.load("resnet20")
    prof = ompq.profile(model, ompq.data.fashion_mnist("train"), num_samples=64)
    cfg = ompq.allocate(prof, size_mb=0.1)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (warns once if the compiled extension is missing)

# Functions named like their module (profile, allocate, ptq, qat, evaluate) are bound eagerly so
# that `ompq.profile` is always the function, whatever imports the submodule first. These modules
# import heavy optional dependencies (ortools, matplotlib, onnx) lazily.
from .layers import LayerInfo, find_layers, measure_layers  # noqa: E402
from .orm import orm_from_grams, orm_matrix  # noqa: E402
from .profile import Profile, profile  # noqa: E402
from .bitconfig import BitConfig  # noqa: E402
from .allocate import InfeasibleBudgetError, allocate  # noqa: E402
from .quantize import QuantScheme, quantize_  # noqa: E402
from .ptq import PTQConfig, PTQResult, ptq  # noqa: E402
from .qat import QATConfig, QATResult, qat  # noqa: E402
from .evaluate import evaluate  # noqa: E402

_LAZY = {
    # name: (module, attribute or None for the module itself)
    "zoo": ("zoo", None),
    "data": ("data", None),
    "bitconfig": ("bitconfig", None),
    "packed": ("packed", None),
    "runtime": ("runtime", None),
    "onnx_export": ("onnx_export", None),
    "report": ("report", None),
    "proxies": ("proxies", None),
    "frontier": ("frontier", None),
    "pipeline": ("pipeline", None),
    "objectives": ("objectives", None),
    "distortion": ("distortion", None),
    "inputs": ("inputs", None),
    "distributed": ("distributed", None),
}


def __getattr__(name: str):
    """Import submodules lazily so `import ompq` stays fast and light."""
    if name not in _LAZY:
        raise AttributeError(f"module 'ompq' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY) + [
    "ops", "__version__", "LayerInfo", "find_layers", "measure_layers", "orm_matrix",
    "orm_from_grams", "Profile", "profile", "BitConfig", "InfeasibleBudgetError", "allocate",
    "quantize_", "QuantScheme", "ptq", "PTQConfig", "PTQResult", "qat", "QATConfig", "QATResult",
    "evaluate",
]
