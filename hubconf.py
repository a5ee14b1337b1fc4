"""torch.hub entry points: ``model, preprocess = torch.hub.load("<owner>/<repo>", "ViT_B_32")``.

One entry point per model of the registry (``clip._registry.MODELS``), named with underscores (``RN50`` ...
``ViT_L_14_336px``), each returning what ``clip.load`` returns, plus ``tokenize``. ``torch.hub.list`` names them
and ``torch.hub.help`` shows their docstrings.
"""
import os
import typing  # not `from typing import ...`: torch.hub lists every public callable of this module
import warnings

import clip as _clip
from clip import _registry

# Modules torch.hub checks are importable before it imports this file.
dependencies = ["torch", "torchvision", "PIL", "ftfy", "regex", "tqdm", "filelock", "packaging"]

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(os.path.dirname(os.path.abspath(_clip.__file__))) != _HERE:
    # torch.hub puts this folder first on sys.path, but a `clip` imported earlier in the process stays in use.
    warnings.warn(f"torch.hub: using the clip package already imported from {os.path.dirname(_clip.__file__)}, "
                  f"not the one in {_HERE}; load from a fresh Python process to use this repository's code")


def _entry_point_name(name: str) -> str:
    return name.replace("/", "_").replace("-", "_").replace("@", "_")


def _entry_point(name: str) -> typing.Callable[..., typing.Any]:
    """A hub entry point that loads the release model ``name``."""

    def entry_point(device: typing.Any = None, jit: bool = False, download_root: typing.Optional[str] = None,
                    **kwargs: typing.Any) -> typing.Any:
        return _clip.load(name, device=device, jit=jit, download_root=download_root, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = _entry_point_name(name)
    entry_point.__doc__ = f"""OpenAI's CLIP {name}, as ``clip.load("{name}", ...)`` returns it.

    The release checkpoint is downloaded into the cache on first use and verified against its SHA-256.

    Parameters
    ----------
    device : str or torch.device, optional
        Default ``"cuda"`` if available, else ``"cpu"``.
    jit : bool
        Return the release's TorchScript model instead of the plain ``torch.nn.Module``.
    download_root : str, optional
        The cache folder; default ``$CLIP_CACHE_DIR``, else the original's ``~/.cache/clip``.
    **kwargs
        Further keyword arguments of ``clip.load``.

    Returns
    -------
    model : torch.nn.Module
        The model in eval mode.
    preprocess : torchvision.transforms.Compose
        Turns a PIL image into the model's input tensor.
    """
    return entry_point


globals().update({_entry_point_name(name): _entry_point(name) for name in _registry.MODELS})


def tokenize(*args: typing.Any, **kwargs: typing.Any) -> typing.Any:
    """Tokenize texts as ``clip.tokenize`` does; called with no arguments, return ``clip.tokenize`` itself.

    ``torch.hub.load(repo, "tokenize")`` gives the function, as the original's hub entry does;
    ``torch.hub.load(repo, "tokenize", ["a photo of a dog"])`` gives the token rows.
    """
    if not args and not kwargs:
        return _clip.tokenize
    return _clip.tokenize(*args, **kwargs)
