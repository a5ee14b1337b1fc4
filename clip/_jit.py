"""The ``jit=True`` path: load a release TorchScript archive and patch its graphs to run on the target device.

Release archives were traced on CUDA in float16: their graphs hold ``Device`` constants naming ``cuda`` and
``aten::to`` casts to dtype code 5 (float16). The device constants are pointed at the target device; on the CPU
the casts and the parameters also become float32, as the original does (every other device keeps float16, as
there). A file that is not an archive returns ``None`` with a warning, and ``load`` falls back to the plain
model; any other error (TorchScript failing, CUDA out of memory) is raised.
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
    """Load a TorchScript archive onto ``device``, patched to run there; ``None`` (with a warning) for a file that
    is not an archive.

    On the CPU the archive runs in float32; elsewhere (CUDA, mps, xpu, ...) it keeps its float16 weights.
    """
    if not is_torchscript_archive(path):
        warnings.warn(f"{path} is not a TorchScript archive, so jit=True cannot apply; loading it as a plain "
                      f"PyTorch model instead (jit=False)", stacklevel=3)
        return None
    with warnings.catch_warnings():
        # Recent PyTorch deprecates TorchScript: the user asked for it, so its deprecation notice is noise.
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(path, map_location=device).eval()
    _patch_devices(model, device)
    if device.type == "cpu":
        _patch_float16_casts(model)
        model.float()
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
    """Make every float16 dtype constant that an ``aten::to`` cast takes a float32 one, as the original does.

    The dtype is the cast's second or third input. TorchScript pools equal constants, so the release ViTs' single
    float16 constant also gives the class token's ``aten::zeros`` its dtype: rewriting it in place makes those zeros
    float32 too, exactly as in the original.
    """
    for graph in _graphs(model):
        for cast in graph.findAllNodes("aten::to"):
            for value in list(cast.inputs())[1:3]:
                constant = value.node()
                if (constant.kind() == "prim::Constant" and constant.hasAttribute("value")
                        and constant.kindOf("value") == "i" and constant.i("value") == _FLOAT16):
                    constant.i_("value", _FLOAT32)
