"""Checkpoints from elsewhere: ``.safetensors`` files, open_clip and Hugging Face ``transformers`` CLIP checkpoints.

Placeholder: the readers below are the interface ``_checkpoint.read_state_dict`` calls.
"""
import os
from typing import Dict

import torch

StateDict = Dict[str, torch.Tensor]


def is_safetensors(path: str) -> bool:
    """Whether ``path`` looks like a safetensors file (by its header), without reading the tensors."""
    return False


def read_safetensors(path: str) -> StateDict:
    raise NotImplementedError


def read_folder(path: str) -> StateDict:
    """A checkpoint folder (Hugging Face ``config.json`` + weights) as an OpenAI-layout state dict."""
    raise IsADirectoryError(f"{path} is a directory; expected a checkpoint file (.pt, .pth) or a release name "
                            f"from clip.available_models()")


def to_openai_layout(state_dict: StateDict, path: str) -> StateDict:
    """Rename the keys of other known layouts (open_clip, Hugging Face) to the release's; others pass unchanged."""
    return state_dict
