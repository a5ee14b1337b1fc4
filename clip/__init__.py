"""The original's top-level names (``load``, ``tokenize``, ``available_models``, looked up in ``clip.clip`` on first
use) and ``__version__``. It must never import torch at import: ``import clip`` and the cache commands stay cheap.
"""
import importlib
from typing import Any, List

__version__ = "1.0.0"

__all__ = ["available_models", "load", "tokenize"]

# The original's submodules, imported on first access as ``clip.clip``, ``clip.model``, ``clip.simple_tokenizer``.
_SUBMODULES = ("clip", "model", "simple_tokenizer")


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".clip", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
