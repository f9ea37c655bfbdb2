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

# NOTE (coordinator): the public functions whose names equal their module's name (profile,
# allocate, ptq, qat, evaluate) are imported eagerly here once those modules exist.
_LAZY = {
    # name: (module, attribute or None for the module itself)
    "zoo": ("zoo", None),
    "data": ("data", None),
    "export": ("export", None),
    "report": ("report", None),
    "proxies": ("proxies", None),
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


__all__ = sorted(_LAZY) + ["ops", "__version__"]
