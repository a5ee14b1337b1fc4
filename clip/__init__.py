"""A fast, trustworthy drop-in replacement for OpenAI's ``clip`` package.

``import clip; model, preprocess = clip.load("ViT-B/32")`` works as with the original; see ``clip.clip``. The
original's names are looked up on first use (a module ``__getattr__``), so ``import clip`` and the command line's
cache commands do not import torch.
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
