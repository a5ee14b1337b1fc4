"""The original's entry points: ``_MODELS``, ``available_models``, ``load``, ``_download``, ``tokenize`` and
``_transform``, and ``open_image`` beside the preprocessing. ``load`` must never hash a verified cached file nor
use TorchScript unless ``jit=True``.
"""
import os
from typing import Any, List, Optional, Tuple, Union

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from . import _cache, _registry
from ._checkpoint import no_checkpoint_error
from ._decode import open_image  # noqa: F401 (public: preprocess(open_image(path, n_px)) is clip embed --fast-decode)
from ._layouts import read_state_dict
from .model import CLIP, build_model, model_from_state_dict  # noqa: F401 (the original's import)
from . import simple_tokenizer as _simple_tokenizer
from .simple_tokenizer import SimpleTokenizer as _Tokenizer  # noqa: F401  (the original's alias; clients import it)

__all__ = ["available_models", "load", "tokenize"]

BICUBIC = InterpolationMode.BICUBIC
PathLike = Union[str, bytes, "os.PathLike[str]"]

# The release checkpoints (name -> URL; the folder in each URL is the file's SHA-256). Clients read and replace
# this dict, so load() looks it up here at call time.
_MODELS = _registry.MODELS

# The ImageNet-like statistics CLIP's training images were normalised with.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def available_models() -> List[str]:
    """The names of the release models, as accepted by :func:`load`."""
    return list(_MODELS.keys())


def _download(url: str, root: Optional[str] = None) -> str:
    """Download ``url`` into ``root`` (default: the cache folder) unless a verified copy is there; return its path.

    The expected SHA-256 is the URL's second-to-last path segment. See ``clip._cache`` for the details:
    atomic writes, resume, retries, mirrors, a lock between processes and a verified-once record.
    """
    return _cache.download(url, root)


def verify_cache(download_root: Optional[str] = None) -> list:
    """Re-hash every recorded file in the cache folder and report each; see ``clip._cache.verify_cache``."""
    return _cache.verify_cache(download_root)


def tokenize(texts: Union[str, List[str]], context_length: int = 77, truncate: bool = False) -> torch.IntTensor:
    """Tokenize text(s) into CLIP's input rows: an int32 tensor ``[number of texts, context_length]``.

    Each row is 49406 (start of text), the text's ids, 49407 (end of text), then zeros. A text that does not fit
    raises ``RuntimeError`` unless ``truncate``, which cuts it and ends the row with 49407. See
    ``clip.simple_tokenizer.tokenize``. A tokenizer a client assigns to ``clip.clip._tokenizer`` is used, as the
    original used its module-level tokenizer.
    """
    # Only an assigned attribute is in globals(); reading clip.clip._tokenizer otherwise goes to __getattr__ below.
    return _simple_tokenizer.tokenize(texts, context_length, truncate, tokenizer=globals().get("_tokenizer"))


def _convert_image_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _transform(n_px: int) -> Compose:
    """The preprocessing for ``n_px`` x ``n_px`` inputs: resize the short side, center-crop, RGB, normalise.

    The RGB conversion comes after the crop, as in the original, so palette and RGBA images give the same tensors.
    """
    return Compose([
        Resize(n_px, interpolation=BICUBIC),
        CenterCrop(n_px),
        _convert_image_to_rgb,
        ToTensor(),
        Normalize(_MEAN, _STD),
    ])


def load(name: PathLike,
         device: Union[str, torch.device, None] = None,
         jit: bool = False,
         download_root: Optional[PathLike] = None) -> Tuple[Union[CLIP, torch.jit.ScriptModule], Compose]:
    """Load a CLIP model.

    Parameters
    ----------
    name : str, bytes or os.PathLike
        A model name listed by :func:`available_models` (also spelled as its file, ``"ViT-B-32"``, in any case),
        or the path to a checkpoint: a release archive, a ``torch.save`` state dict, a wrapped checkpoint
        (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` prefixes), a ``.safetensors`` file, or a
        Hugging Face or open_clip CLIP folder of an architecture this model computes exactly.
    device : str or torch.device, optional
        Where to put the model; default ``"cuda"`` if available, else ``"cpu"``, decided at call time.
    jit : bool
        Load the release's TorchScript archive (patched to run on ``device``) instead of the plain model.
    download_root : str or os.PathLike, optional
        The cache folder for downloads; default ``$CLIP_CACHE_DIR``, else the original's ``~/.cache/clip``.

    Returns
    -------
    model : torch.nn.Module
        The model in eval mode: on the CPU in float32; on any other device (CUDA, mps, ...) with the release's
        float16 weights, as the original.
    preprocess : torchvision.transforms.Compose
        Turns a PIL image into the input tensor the model expects.
    """
    device = _resolve_device(device)
    path = _checkpoint_path(name, download_root)

    if jit:
        from . import _jit  # TorchScript only for those who ask for it

        jit_model = _jit.load_jit(path, device)
        if jit_model is not None:
            return jit_model, _transform(_jit.input_resolution(jit_model))

    model = _build(path, device)
    return model, _transform(model.visual.input_resolution)


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _checkpoint_path(name: PathLike, download_root: Optional[PathLike]) -> str:
    """The local file for a release name (downloaded into the cache if needed) or a path.

    In the original's order: an exact registry key, then an existing path, then our other spellings of a release
    name ("vit-b-32"), so a file or folder called "vit-b-32" in the working directory is loaded, not the release.
    """
    if name is None:  # the original's os.path.isfile(None) raised a TypeError
        raise TypeError("load() needs a model name from clip.available_models() or a checkpoint path, not None")
    if not isinstance(name, (str, bytes, os.PathLike)):
        raise RuntimeError(f"Model {name!r} not found: load() takes a model name from clip.available_models() or a "
                           f"checkpoint path, not a {type(name).__name__}")
    name = os.fsdecode(name)  # a bytes path or any os.PathLike, as str
    # Looked up at call time: clients replace clip.clip._MODELS and clip.clip._download.
    if name in _MODELS:
        return _download(_MODELS[name], _cache.cache_dir(download_root))
    path = os.path.expanduser(name)
    if os.path.lexists(path):  # also a broken link or a loop of links: the reader says which
        return path
    release = _registry.release_name(name, _MODELS)
    if release is not None:
        return _download(_MODELS[release], _cache.cache_dir(download_root))
    if _looks_like_path(name):
        raise no_checkpoint_error(name)
    raise RuntimeError(_registry.not_found_message(name, _MODELS))


def _looks_like_path(name: str) -> bool:
    """Whether a name that is neither a release nor an existing file was meant as a file path."""
    folder = os.path.dirname(name)
    return (os.path.isabs(name) or name.startswith((".", "~"))
            or os.path.splitext(name)[1].lower() in (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
            or (bool(folder) and os.path.isdir(folder)))


def _build(path: str, device: torch.device) -> CLIP:
    """The plain model from a checkpoint file, its tensors converted once, straight to their device and dtype."""
    # As the original: the release's float16 weights everywhere but on the CPU (CUDA, and also mps, xpu, ...).
    return model_from_state_dict(read_state_dict(path), device=device, half=device.type != "cpu", consume=True,
                                 source=path)


def __getattr__(name: str) -> Any:
    # The original built a module-level tokenizer at import; ours is made on first use by clients that touch it.
    if name == "_tokenizer":
        return _simple_tokenizer._default_tokenizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
