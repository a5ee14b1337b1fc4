"""The ``jit=True`` path: load a release TorchScript archive and patch its graphs to run on the target device.

Release archives were traced on CUDA in float16: their graphs hold ``Device`` constants naming ``cuda`` and
``aten::to`` casts to dtype code 5 (float16). Off CUDA, both are rewritten (to the target device and to float32)
and the parameters are cast to float32, as the original does. Anything that goes wrong returns ``None`` with a
warning, and ``load`` falls back to the plain PyTorch model.
"""
import warnings
from typing import Iterator, Optional

import torch

from ._checkpoint import is_torchscript_archive

__all__ = ["input_resolution", "load_jit"]

# TorchScript's integer codes for dtypes (c10::ScalarType): the archives cast with these.
_FLOAT16 = 5
_FLOAT32 = 6


def load_jit(path: str, device: torch.device) -> Optional[torch.jit.ScriptModule]:
    """Load a TorchScript archive onto ``device``, patched to run there; ``None`` (with a warning) if it can't.

    On CUDA the archive keeps its float16 weights; elsewhere it runs in float32.
    """
    if not is_torchscript_archive(path):
        warnings.warn(f"{path} is not a TorchScript archive, so jit=True cannot apply; loading it as a plain "
                      f"PyTorch model instead (jit=False)", stacklevel=3)
        return None
    try:
        with warnings.catch_warnings():
            # Recent PyTorch deprecates TorchScript: the user asked for it, so its deprecation notice is noise.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(path, map_location=device).eval()
        _patch_devices(model, device)
        if device.type != "cuda":
            _patch_float16_casts(model)
            model.float()
    except Exception as e:  # TorchScript missing, removed or failing: the plain model can still serve
        warnings.warn(f"TorchScript could not load {path} on {device} ({type(e).__name__}: {e}); loading it as a "
                      f"plain PyTorch model instead (jit=False)", stacklevel=3)
        return None
    return model


def input_resolution(model: torch.jit.ScriptModule) -> int:
    """The image size the archive expects: its ``input_resolution`` scalar, else read off its weights."""
    if hasattr(model, "input_resolution"):
        return int(model.input_resolution.item())
    from .model import infer_dims

    return infer_dims(model.state_dict()).image_resolution


def _graphs(model: torch.jit.ScriptModule) -> Iterator[torch._C.Graph]:
    """The graph of every method of every submodule (forward, encode_image, encode_text, ...)."""
    for module in model.modules():
        for name in module._c._method_names():
            yield module._c._get_method(name).graph


def _patch_devices(model: torch.jit.ScriptModule, device: torch.device) -> None:
    """Point every CUDA device constant at ``device``."""
    for graph in _graphs(model):
        for node in graph.findAllNodes("prim::Constant"):
            if (node.hasAttribute("value") and str(node.output().type()) == "Device"
                    and node.s("value").startswith("cuda")):
                node.s_("value", str(device))


def _patch_float16_casts(model: torch.jit.ScriptModule) -> None:
    """Make every float16 dtype constant that an ``aten::to`` cast uses a float32 one, as the original does.

    TorchScript pools equal constants, so the release ViTs' single float16 constant also gives the class token's
    ``aten::zeros`` its dtype; like the original, we rewrite it for every use that takes a dtype, so those zeros are
    float32 too. A use that takes it as a plain integer (never seen in a release) keeps the value 5 through a copy.
    """
    for graph in _graphs(model):
        for constant in graph.findAllNodes("prim::Constant"):
            if not (constant.hasAttribute("value") and constant.kindOf("value") == "i"
                    and constant.i("value") == _FLOAT16):
                continue
            uses = [(use, _takes_dtype(use)) for use in constant.output().uses()]
            if not any(use.user.kind() == "aten::to" and dtype for use, dtype in uses):
                continue
            integer_uses = [use for use, dtype in uses if not dtype]
            if integer_uses:
                integer = graph.create("prim::Constant")
                integer.i_("value", _FLOAT16)
                integer.output().setType(constant.output().type())
                integer.insertBefore(constant)
                for use in integer_uses:
                    use.user.replaceInput(use.offset, integer.output())
            constant.i_("value", _FLOAT32)


def _takes_dtype(use: "torch._C.Use") -> bool:
    """Whether the input a use feeds is the ``dtype`` argument of the operator's schema."""
    try:
        schema = torch._C.parse_schema(use.user.schema())
    except RuntimeError:  # "(no schema)": not an operator call, so not a dtype argument
        return False
    arguments = schema.arguments
    # TorchScript types a ScalarType argument as int, so the argument's name is what tells a dtype.
    return use.offset < len(arguments) and arguments[use.offset].name == "dtype"
