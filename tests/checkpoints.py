"""Synthetic checkpoints for tests: release-shaped state dicts and TorchScript archives of our own model.

No real CLIP weights can be fetched here, so tests make their own: from the golden tiny models, or random weights
of any architecture. ``save_archive`` traces our model in the release dtypes and stores the three integer scalars
that release archives carry, so the file has the release layout (a TorchScript zip, float16 casts in its graphs).
"""
import dataclasses
import json
import pathlib
import warnings
from typing import Dict, Optional, Tuple

import torch

from clip.model import ARCHIVE_SCALAR_KEYS, CLIP, ModelDims, build_model, convert_weights

StateDict = Dict[str, torch.Tensor]
RELEASE_TABLES = pathlib.Path(__file__).resolve().parent / "data" / "state-dicts"

# A small ViT with the release vocabulary and context, quick to build and run.
TINY_VIT = ModelDims(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=2)
TINY_RN = ModelDims(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                    vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                    transformer_heads=1, transformer_layers=2)


def release_table(file_stem: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` of a release checkpoint (``"ViT-B-32"``), from ``data/state-dicts``."""
    lines = (RELEASE_TABLES / f"{file_stem}.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["key", "shape", "dtype"], lines[0]
    rows = (line.split("\t") for line in lines[1:])
    return {key: (tuple(json.loads(shape)), dtype) for key, shape, dtype in rows}


def random_state_dict(dims: ModelDims = TINY_VIT, seed: int = 0) -> StateDict:
    """A release-shaped state dict (release dtypes and scalar keys) with random weights."""
    torch.manual_seed(seed)
    model = CLIP(**dataclasses.asdict(dims))
    convert_weights(model)
    state_dict = model.state_dict()
    state_dict.update(_scalars(dims))
    return state_dict


def _scalars(dims: ModelDims) -> StateDict:
    return {
        "input_resolution": torch.tensor(dims.image_resolution),
        "context_length": torch.tensor(dims.context_length),
        "vocab_size": torch.tensor(dims.vocab_size),
    }


def save_state_dict(path, state_dict: StateDict, *, wrap: Optional[str] = None, prefix: str = "") -> str:
    """``torch.save`` a state dict, optionally as ``{wrap: state_dict}`` with ``prefix`` on every key."""
    tensors = {prefix + k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALAR_KEYS}
    torch.save({wrap: tensors} if wrap else tensors, path)
    return str(path)


def save_archive(path, state_dict: StateDict) -> str:
    """Save a TorchScript archive traced from our model with these weights, laid out like a release file."""
    model = build_model(state_dict)
    for key, value in _scalars(_dims_of(model)).items():
        model.__dict__.pop(key, None)  # the plain attributes give way to the archive's tensor scalars
        model.register_buffer(key, value)
    size = model.visual.input_resolution
    image = torch.randn(2, 3, size, size)
    text = torch.zeros(2, model.positional_embedding.shape[0], dtype=torch.long)
    text[:, 0], text[:, 1:4], text[:, 4] = 49406, 1000, 49407
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            model, {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)}, check_trace=False)
    traced.save(str(path))
    return str(path)


def _dims_of(model: CLIP) -> ModelDims:
    from clip.model import infer_dims

    return infer_dims(model.state_dict())
