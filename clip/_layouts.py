"""Folders and other key layouts (Hugging Face ``transformers``, open_clip) mapped onto the release keys by
:func:`read_state_dict`, their configs checked against their weights. It must never accept a model that
``clip.model.CLIP`` does not compute exactly.
"""
import dataclasses
import json
import math
import os
import re
import reprlib
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ._checkpoint import StateDict, read_file
from ._errors import CheckpointError, format_keys
from ._text_trim import is_causal_mask
from .model import HEAD_WIDTH, MLP_RATIO, checked_dims

__all__ = ["read_state_dict", "read_folder", "to_openai_layout"]

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Sharded weights come as <weights file>.index.json, whose "weight_map" names the file holding each tensor.
_INDEX_SUFFIX = ".index.json"

# nn.LayerNorm's default eps, which clip.model's LayerNorms use.
_LAYER_NORM_EPS = 1e-5
# transformers' pre-2023 CLIP configs say eos_token_id=2; it then pools at the highest token id, as clip does.
_HF_LEGACY_EOS_ID = 2


def read_state_dict(path: str) -> StateDict:
    """Read a checkpoint file or folder into a flat ``{key: tensor}`` dict on the CPU, in the release layout.

    Tensors of zip files are views of private memory maps of the file (see ``_checkpoint.read_file``): callers
    that keep them copy them (``build_model`` does).

    Raises
    ------
    CheckpointError
        When ``path`` names nothing (``CheckpointNotFoundError``), a folder that is not a checkpoint, or when the
        file is empty, truncated, not a checkpoint, wants to run code, holds no tensors, or holds a model
        that ``clip.model.CLIP`` does not compute exactly.
    StateDictError
        (a ``CheckpointError``) When a folder's tensors are not a CLIP state dict, as ``build_model`` raises for a
        file's.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_folder(path)
    return to_openai_layout(read_file(path), path)


# --------------------------------------------------------------------------------------------------------------
# folders: Hugging Face (config.json) and open_clip (open_clip_config.json)


def read_folder(path: str) -> StateDict:
    """Read a checkpoint folder into a release-layout state dict.

    Two kinds of folder are understood: open_clip's (``open_clip_config.json`` with ``open_clip_model.safetensors``
    or ``open_clip_pytorch_model.bin``, as ``open_clip.push_to_hf_hub``/``save_for_hf`` write them) and Hugging
    Face ``transformers``' (``config.json`` of ``model_type`` ``"clip"`` with ``model.safetensors`` or
    ``pytorch_model.bin``, possibly sharded, as ``CLIPModel.save_pretrained`` writes them). The configuration is
    checked first: a model that ``clip.model.CLIP`` would not compute exactly is refused; then the weights must
    have the sizes the configuration gives.

    Raises
    ------
    CheckpointError
        When the folder holds neither configuration file, when the configuration describes an architecture that
        is not supported or that its weights do not have, or the weights are missing; ``StateDictError`` when the
        weights are not a CLIP state dict.
    """
    open_clip_config = os.path.join(path, OPEN_CLIP_CONFIG)
    if os.path.isfile(open_clip_config):
        model_cfg = _read_json(open_clip_config).get("model_cfg", {})
        _expect(isinstance(model_cfg, dict), open_clip_config, "model_cfg", model_cfg, "an object")
        expected = _check_open_clip_config(model_cfg, open_clip_config, path)
        tensors = _read_weights(path, OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG)
        state_dict = _open_clip_to_openai(tensors, path)
        _check_agreement(expected, state_dict, open_clip_config, path)
        return state_dict
    hf_config = os.path.join(path, HF_CONFIG)
    if os.path.isfile(hf_config):
        return _hf_checked(lambda: _read_weights(path, HF_WEIGHTS, HF_CONFIG), hf_config, path)
    raise CheckpointError(
        f"{path} is a directory without {HF_CONFIG} (Hugging Face) or {OPEN_CLIP_CONFIG} (open_clip); expected a "
        f"checkpoint file (.pt, .pth, .safetensors), such a folder, or a release name from clip.available_models()")


def _hf_checked(read_tensors: Callable[[], Mapping[str, torch.Tensor]], config: str, path: str) -> StateDict:
    """A Hugging Face CLIPModel's tensors in our layout, once its ``config`` is supported and agrees with them.

    The config is checked first, so a folder with a bad config fails before its weights are read.
    """
    expected = _check_hf_config(_read_json(config), config)
    state_dict = _hf_to_openai(read_tensors(), path)
    _check_agreement(expected, state_dict, config, path)
    return state_dict


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON syntax, huge ints
        what = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path} is not readable JSON ({what})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def _expect(ok: bool, config_path: str, option: str, value: Any, what: str) -> None:
    """Refuse a configuration value of the wrong type, naming the file, the option and the value."""
    if not ok:
        raise CheckpointError(f"{config_path}: {option} is {reprlib.repr(value)}, expected {what}")


def _positive_int(options: Mapping[str, Any], key: str, default: Any, config_path: str, where: str) -> int:
    value = options.get(key, default)
    _expect(type(value) is int and value > 0, config_path, f"{where}{key}", value, "a positive integer")
    return value


def _section(config: Mapping[str, Any], key: str, config_path: str) -> Mapping[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    _expect(isinstance(value, dict), config_path, key, value, "an object")
    return value


def _check_agreement(expected: Dict[str, Tuple[str, Any]], state_dict: StateDict, config_path: str,
                     path: str) -> None:
    """Refuse weights whose sizes differ from those their configuration gives (a config the weights do not fit).

    ``expected`` maps ``ModelDims`` fields (and ``vision_heads``) to the configuration's option and value. Weights
    that are not a CLIP state dict raise ``StateDictError``, as a file's do.
    """
    dims = dataclasses.asdict(checked_dims(state_dict, path))
    if dims["vision_patch_size"] is not None:  # ViT heads; ResNet attention-pool heads are not configured
        dims["vision_heads"] = dims["vision_width"] // HEAD_WIDTH
    differences = [f"{option}={value!r} where the weights have {dims[name]!r}"
                   for name, (option, value) in expected.items() if name in dims and dims[name] != value]
    if differences:
        raise CheckpointError(f"{config_path} does not describe the weights beside it: {'; '.join(differences)}. "
                              f"Fix the configuration or the weights; a model is not loaded from a mismatched pair")


def _read_weights(folder: str, names: Sequence[str], config_name: str) -> StateDict:
    """The tensors of the first weights file (or sharded set) of ``names`` present in ``folder``."""
    for name in names:
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            return read_file(file)
        if os.path.isfile(file + _INDEX_SUFFIX):
            return _read_shards(folder, file + _INDEX_SUFFIX)
    raise CheckpointError(f"{folder} has {config_name} but no weights: expected "
                          f"{' or '.join(names)} (or a sharded {names[0]}{_INDEX_SUFFIX})")


def _read_shards(folder: str, index_path: str) -> StateDict:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map; it is not a sharded-weights index")
    shards = list(weight_map.values())
    for shard in shards:
        # Shards sit beside their index; a path elsewhere is refused rather than followed.
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path} names a shard outside its folder: {reprlib.repr(shard)}")
    tensors: StateDict = {}
    for shard in sorted(set(shards)):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path} lists the shard {shard}, which is missing from {folder}")
        tensors.update(read_file(shard_path))
    return tensors


# --------------------------------------------------------------------------------------------------------------
# layout detection


def to_openai_layout(state_dict: StateDict, path: str) -> StateDict:
    """Map a state dict of a known layout onto the release's key names.

    Hugging Face ``CLIPModel`` state dicts (``text_model.*``, ``vision_model.*``) are converted; when a
    ``config.json`` lies beside the file it is checked, against the weights too, otherwise a warning says that the
    activation and head count could not be. open_clip state dicts are normalised (``text.`` prefix of
    ``CustomTextCLIP``, the causal ``attn_mask`` buffer, a one-element ``logit_scale``). A release-layout dict is
    returned as it is. The input dict is never modified.

    Raises
    ------
    CheckpointError
        When the state dict holds parts ``clip.model.CLIP`` lacks (the message names them).
    """
    if any(key.startswith(("text_model.", "vision_model.")) for key in state_dict):
        config = os.path.join(os.path.dirname(os.path.abspath(path)), HF_CONFIG)
        if os.path.isfile(config):
            return _hf_checked(lambda: state_dict, config, path)
        warnings.warn(f"{path} holds a Hugging Face CLIPModel state dict without its {HF_CONFIG}, so its "
                      f"activation and attention heads cannot be checked; assuming the OpenAI architecture "
                      f"(quick_gelu, 64-dimensional heads). Load the saved folder to have them checked",
                      stacklevel=2)
        return _hf_to_openai(state_dict, path)
    return _open_clip_to_openai(state_dict, path)


# --------------------------------------------------------------------------------------------------------------
# open_clip


# Keys of parts that open_clip models may have and clip.model.CLIP has not, and what each part is.
_UNSUPPORTED_KEYS: Tuple[Tuple[str, str], ...] = (
    (r"(^|\.)logit_bias$", "a learned logit bias (a SigLIP-style sigmoid loss)"),
    (r"^visual\.attn_pool", "an attentional pooler on the image tower (open_clip attentional_pool, CoCa)"),
    (r"^text_decoder\.", "a multimodal text decoder (CoCa)"),
    (r"\.ls_[12]\.gamma$", "layer scale (open_clip ls_init_value)"),
    (r"^visual\.trunk\.", "a timm image tower"),
    (r"^text\.(transformer\.(embeddings|encoder)\.|proj\.)", "a Hugging Face text tower (open_clip hf_model_name)"),
    (r"(^|\.)cls_emb$", "a text class token (open_clip embed_cls)"),
    (r"\.attn\.(ln_q|ln_k|ln_inner|logit_scale|head_scale)(\.|$)|\.ln_attn\.|\.mlp\.ln\.",
     "a custom attention block (open_clip qk_norm, scaled cosine attention, head scaling or extra LayerNorms)"),
    (r"^(text\.)?text_projection\.bias$", "a bias on the text projection (open_clip proj_bias)"),
)

# CustomTextCLIP keeps the OpenAI text tower under "text."; CLIP flattens it onto the model, as the release does.
_OPEN_CLIP_TEXT_PREFIX = "text."


def _open_clip_to_openai(state_dict: StateDict, path: str) -> StateDict:
    """An open_clip (or release) state dict in the release layout; the same dict when nothing needs changing."""
    _reject_unsupported(state_dict, path)
    renamed = {_strip_text_prefix(key): key for key in state_dict}
    if len(renamed) != len(state_dict):
        both = sorted(k for k in state_dict if k.startswith(_OPEN_CLIP_TEXT_PREFIX) and _strip_text_prefix(k) in
                      state_dict)
        raise CheckpointError(f"{path} holds text-tower tensors both under 'text.' and at the top level (such as "
                     f"{', '.join(both[:3])}); it is not one CLIP model")
    has_mask = "attn_mask" in renamed  # a causal-mask buffer that older open_clip versions saved
    logit_scale = state_dict.get(renamed.get("logit_scale", ""))
    reshape_scale = logit_scale is not None and logit_scale.shape == (1,)  # open_clip's nonscalar_logit_scale
    if all(new == old for new, old in renamed.items()) and not has_mask and not reshape_scale:
        return state_dict

    result: StateDict = {}
    for new, old in renamed.items():
        tensor = state_dict[old]
        if new == "attn_mask":
            _check_causal_mask(tensor, old, state_dict.get(renamed.get("positional_embedding", "")), path)
            continue  # clip.model builds its causal mask itself; it is not a weight
        result[new] = tensor.reshape(()) if (new == "logit_scale" and reshape_scale) else tensor
    return result


def _strip_text_prefix(key: str) -> str:
    return key[len(_OPEN_CLIP_TEXT_PREFIX):] if key.startswith(_OPEN_CLIP_TEXT_PREFIX) else key


_UNSUPPORTED_PATTERNS = tuple((re.compile(pattern), what) for pattern, what in _UNSUPPORTED_KEYS)


def _reject_unsupported(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    found: List[str] = []
    for pattern, what in _UNSUPPORTED_PATTERNS:
        key = next((k for k in state_dict if pattern.search(k)), None)
        if key is not None:
            found.append(f"{what} (key {key})")
    if "visual.class_embedding" in state_dict and "visual.ln_pre.weight" not in state_dict:
        found.append("no LayerNorm before the image transformer (open_clip no_ln_pre)")
    if found:
        raise CheckpointError(f"{path} holds a model with parts that clip's model does not have: {'; '.join(found)}. "
                              f"Only the OpenAI CLIP architectures are supported; load this checkpoint with open_clip "
                              f"instead")


def _check_causal_mask(mask: torch.Tensor, key: str, positions: Optional[torch.Tensor], path: str) -> None:
    """Refuse an attention mask other than the causal one of the context length (checked by shape first, so a
    mask claiming a huge size is never compared element by element)."""
    n = positions.shape[0] if positions is not None and positions.dim() == 2 else None
    if n is None or mask.shape != (n, n):
        raise CheckpointError(f"{path}: {key} has shape {tuple(mask.shape)}, where the causal attention mask of the "
                              f"text transformer is context length x context length (positional_embedding: "
                              f"{None if positions is None else tuple(positions.shape)})")
    if not is_causal_mask(mask.float(), n):
        raise CheckpointError(f"{path}: {key} is not the causal attention mask that clip's text transformer uses; a "
                              f"text tower with another mask is not supported")


# open_clip model_cfg options whose other values change the computation: (section, option, open_clip's default,
# the values clip.model computes, what another value means). Options not listed do not change the function.
_OPEN_CLIP_OPTIONS: Tuple[Tuple[str, str, Any, Tuple[Any, ...], str], ...] = (
    ("", "quick_gelu", False, (True,), "GELU activations, where clip's model computes QuickGELU (the activation "
                                       "OpenAI's weights were trained with)"),
    ("", "init_logit_bias", None, (None,), "a learned logit bias (a SigLIP-style sigmoid loss)"),
    ("vision_cfg", "timm_model_name", None, (None,), "a timm image tower"),
    ("vision_cfg", "head_width", HEAD_WIDTH, (HEAD_WIDTH,), "attention heads that are not 64-dimensional"),
    ("vision_cfg", "ls_init_value", None, (None,), "layer scale"),
    ("vision_cfg", "attentional_pool", False, (False,), "an attentional pooler"),
    ("vision_cfg", "no_ln_pre", False, (False,), "no LayerNorm before the image transformer"),
    ("vision_cfg", "pos_embed_type", "learnable", ("learnable",), "fixed position embeddings"),
    ("vision_cfg", "final_ln_after_pool", False, (False,), "the final LayerNorm after pooling"),
    ("vision_cfg", "pool_type", "tok", ("tok",), "image pooling other than the class token"),
    ("vision_cfg", "block_type", None, (None, "default"), "a custom attention block"),
    ("vision_cfg", "qk_norm", False, (False,), "query-key normalisation"),
    ("vision_cfg", "scaled_cosine_attn", False, (False,), "scaled cosine attention"),
    ("vision_cfg", "scale_heads", False, (False,), "head scaling"),
    ("vision_cfg", "scale_attn_inner", False, (False,), "an extra LayerNorm inside attention"),
    ("vision_cfg", "scale_attn", False, (False,), "an extra LayerNorm after attention"),
    ("vision_cfg", "scale_fc", False, (False,), "an extra LayerNorm inside the MLP"),
    ("vision_cfg", "act_kwargs", None, (None, {}), "activation options"),
    ("vision_cfg", "norm_kwargs", None, (None, {}), "LayerNorm options (such as eps)"),
    ("text_cfg", "hf_model_name", None, (None,), "a Hugging Face text tower"),
    ("text_cfg", "ls_init_value", None, (None,), "layer scale"),
    ("text_cfg", "embed_cls", False, (False,), "a text class token"),
    ("text_cfg", "no_causal_mask", False, (False,), "a text transformer without the causal mask"),
    ("text_cfg", "final_ln_after_pool", False, (False,), "the final LayerNorm after pooling"),
    ("text_cfg", "pool_type", "argmax", ("argmax",), "text pooling other than at the highest token id"),
    ("text_cfg", "proj_bias", False, (False,), "a bias on the text projection"),
    ("text_cfg", "proj_type", "linear", ("linear",), "a text projection other than one matrix"),
    ("text_cfg", "block_type", None, (None, "default"), "a custom attention block"),
    ("text_cfg", "act_kwargs", None, (None, {}), "activation options"),
    ("text_cfg", "norm_kwargs", None, (None, {}), "LayerNorm options (such as eps)"),
)
# open_clip's defaults (CLIPVisionCfg, CLIPTextCfg) for the sizes a model_cfg leaves out.
_OPEN_CLIP_VISION_DEFAULTS = {"layers": 12, "width": 768, "patch_size": 16, "image_size": 224}
_OPEN_CLIP_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_OPEN_CLIP_EMBED_DIM = 512


def _check_open_clip_config(model_cfg: Mapping[str, Any], config_path: str,
                            folder: str) -> Dict[str, Tuple[str, Any]]:
    """Refuse an open_clip model_cfg that clip's model does not compute exactly; return the sizes it gives, as
    ``ModelDims`` fields, for :func:`_check_agreement`."""
    sections = {name: _section(model_cfg, name, config_path) for name in ("vision_cfg", "text_cfg")}
    problems: List[str] = []
    for section, option, default, supported, what in _OPEN_CLIP_OPTIONS:
        value = sections[section].get(option, default) if section else model_cfg.get(option, default)
        if value not in supported:
            where = f"{section}.{option}" if section else option
            problems.append(f"{what} ({where}={reprlib.repr(value)})")
    if "multimodal_cfg" in model_cfg:
        problems.append("a multimodal text decoder (CoCa)")
    expected = _open_clip_sizes(model_cfg, sections["vision_cfg"], sections["text_cfg"], config_path)
    width, heads = expected["transformer_width"][1], expected["transformer_heads"][1]
    if heads != width // HEAD_WIDTH:
        problems.append(f"{heads} text attention heads for width {width}, where clip's model uses "
                        f"width // {HEAD_WIDTH} = {width // HEAD_WIDTH} heads (text_cfg.heads={heads})")
    if problems:
        raise CheckpointError(f"{config_path} describes an open_clip model that clip's model does not compute "
                              f"exactly: {'; '.join(problems)}. Load it with open_clip instead, e.g. "
                              f"open_clip.create_model_and_transforms('local-dir:{folder}')")
    return expected


def _open_clip_sizes(model_cfg: Mapping[str, Any], vision: Mapping[str, Any], text: Mapping[str, Any],
                     config_path: str) -> Dict[str, Tuple[str, Any]]:
    """The sizes an open_clip model_cfg gives, checked for type: ``{ModelDims field: (option, value)}``."""
    layers = vision.get("layers", _OPEN_CLIP_VISION_DEFAULTS["layers"])
    resnet = isinstance(layers, (list, tuple))
    _expect(type(layers) is int and layers >= 0 or resnet and len(layers) == 4
            and all(type(n) is int and n > 0 for n in layers),
            config_path, "vision_cfg.layers", layers, "an integer, or four for a ResNet")
    image_size = vision.get("image_size", _OPEN_CLIP_VISION_DEFAULTS["image_size"])
    if isinstance(image_size, (list, tuple)) and len(image_size) == 2 and image_size[0] == image_size[1]:
        image_size = image_size[0]  # a square [height, width]
    _expect(type(image_size) is int and image_size > 0, config_path, "vision_cfg.image_size", image_size,
            "a positive integer (or a square [height, width])")
    sizes = {
        "embed_dim": ("embed_dim", _positive_int(model_cfg, "embed_dim", _OPEN_CLIP_EMBED_DIM, config_path, "")),
        "image_resolution": ("vision_cfg.image_size", image_size),
        "vision_layers": ("vision_cfg.layers", tuple(layers) if resnet else layers),
        "vision_width": ("vision_cfg.width", _positive_int(vision, "width", _OPEN_CLIP_VISION_DEFAULTS["width"],
                                                           config_path, "vision_cfg.")),
        "vision_patch_size": ("vision_cfg.patch_size", None if resnet else _positive_int(
            vision, "patch_size", _OPEN_CLIP_VISION_DEFAULTS["patch_size"], config_path, "vision_cfg.")),
    }
    for field, option in (("context_length", "context_length"), ("vocab_size", "vocab_size"),
                          ("transformer_width", "width"), ("transformer_heads", "heads")):
        value = _positive_int(text, option, _OPEN_CLIP_TEXT_DEFAULTS[option], config_path, "text_cfg.")
        sizes[field] = (f"text_cfg.{option}", value)
    text_layers = text.get("layers", _OPEN_CLIP_TEXT_DEFAULTS["layers"])
    _expect(type(text_layers) is int and text_layers >= 0, config_path, "text_cfg.layers", text_layers,
            "an integer")
    sizes["transformer_layers"] = ("text_cfg.layers", text_layers)
    return sizes


# --------------------------------------------------------------------------------------------------------------
# Hugging Face transformers


# transformers' names of the tensors outside the encoder layers, and the release's.
_HF_RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers spells it "layrnorm"
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
# Projections that transformers stores as nn.Linear weights (out, in) and the release as matrices (in, out).
_HF_TRANSPOSED = {
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
}
# Encoder layers: the tower, the layer index, the name inside the layer.
_HF_LAYER = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_BLOCKS = {"text": "transformer.resblocks", "vision": "visual.transformer.resblocks"}
# Names inside a layer (before ".weight"/".bias"), and the release's.
_HF_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
# Buffers of older transformers versions that are not weights: position indices 0..n-1.
_HF_IGNORED = re.compile(r"^(text|vision)_model\.embeddings\.position_ids$")


def _hf_to_openai(state_dict: Mapping[str, torch.Tensor], path: str) -> StateDict:
    """A Hugging Face ``CLIPModel`` state dict with the release's names and packed attention projections."""
    result: StateDict = {}
    packed: Dict[str, Dict[str, torch.Tensor]] = {}  # in_proj key -> {"q": ..., "k": ..., "v": ...}
    unknown: List[str] = []
    for key, tensor in state_dict.items():
        if key in _HF_RENAMES:
            result[_HF_RENAMES[key]] = tensor
        elif key in _HF_TRANSPOSED:
            _check_dims(tensor, 2, key, path)
            result[_HF_TRANSPOSED[key]] = tensor.t().contiguous()  # (embed, width) -> (width, embed)
        elif _HF_IGNORED.match(key):
            continue
        else:
            target = _hf_layer_key(key)
            if target is None:
                unknown.append(key)
            elif isinstance(target, tuple):
                in_proj, part = target
                packed.setdefault(in_proj, {})[part] = tensor
            else:
                result[target] = tensor
    if unknown:
        raise CheckpointError(f"{path} is a Hugging Face CLIP checkpoint with tensors that clip's model does not "
                              f"have ({len(unknown)}): {format_keys(sorted(unknown), 10)}. Only CLIPModel with the "
                              f"OpenAI architecture is supported")
    for in_proj, parts in packed.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"{path}: the {'/'.join(missing)} projection of {in_proj} is missing; the "
                                  f"checkpoint is incomplete")
        shapes = {tuple(t.shape) for t in parts.values()}
        if len(shapes) != 1 or parts["q"].dim() not in (1, 2):
            raise CheckpointError(f"{path}: the q, k and v projections of {in_proj} have shapes "
                                  f"{', '.join(str(tuple(parts[p].shape)) for p in 'qkv')}; expected one matrix "
                                  f"(or bias) shape for all three")
        # nn.MultiheadAttention packs the projections as rows [q; k; v]: (3 * width, width) or (3 * width,).
        result[in_proj] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return result


def _check_dims(tensor: torch.Tensor, dims: int, key: str, path: str) -> None:
    if tensor.dim() != dims:
        raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}; expected {dims} dimensions")


def _hf_layer_key(key: str) -> Union[str, Tuple[str, str], None]:
    """The release key of an encoder-layer tensor, ``(in_proj key, "q"|"k"|"v")`` for a part to pack, or None."""
    match = _HF_LAYER.match(key)
    if match is None:
        return None
    tower, index, name = match.groups()
    block = f"{_HF_BLOCKS[tower]}.{index}"
    qkv = _HF_QKV.match(name)
    if qkv is not None:
        part, kind = qkv.groups()
        return f"{block}.attn.in_proj_{kind}", part
    module, _, kind = name.rpartition(".")
    if module in _HF_LAYER_RENAMES and kind in ("weight", "bias"):
        return f"{block}.{_HF_LAYER_RENAMES[module]}.{kind}"
    return None


# transformers' CLIPTextConfig, CLIPVisionConfig and CLIPConfig defaults, for options a config.json leaves out.
_HF_TOWER_DEFAULTS = {
    "text": {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048, "num_hidden_layers": 12,
             "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 49407},
    "vision": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "num_hidden_layers": 12,
               "image_size": 224, "patch_size": 32},
}
_HF_PROJECTION_DIM = 512
_HF_SINGLE_TOWERS = {"clip_text_model": "text", "clip_vision_model": "vision"}
# Each ModelDims field (and the vision heads), the tower and the option of a CLIPConfig that gives it.
_HF_SIZES = (
    ("transformer_width", "text", "hidden_size"),
    ("transformer_heads", "text", "num_attention_heads"),
    ("transformer_layers", "text", "num_hidden_layers"),
    ("context_length", "text", "max_position_embeddings"),
    ("vocab_size", "text", "vocab_size"),
    ("vision_width", "vision", "hidden_size"),
    ("vision_heads", "vision", "num_attention_heads"),
    ("vision_layers", "vision", "num_hidden_layers"),
    ("vision_patch_size", "vision", "patch_size"),
)


def _check_hf_config(config: Mapping[str, Any], config_path: str) -> Dict[str, Tuple[str, Any]]:
    """Refuse a Hugging Face configuration that ``clip.model.CLIP`` would not compute exactly; return the sizes it
    gives, as ``ModelDims`` fields, for :func:`_check_agreement`."""
    model_type = config.get("model_type")
    if model_type in _HF_SINGLE_TOWERS:
        raise CheckpointError(f"{config_path} describes only the {_HF_SINGLE_TOWERS[model_type]} tower of a CLIP "
                              f"model ({model_type}); clip.load needs both towers: save the whole CLIPModel")
    if model_type != "clip":
        raise CheckpointError(f"{config_path} describes a Hugging Face model of type {reprlib.repr(model_type)}; "
                              f"only 'clip' (CLIPModel) checkpoints of the OpenAI architecture are supported")
    problems: List[str] = []
    towers, sections = {}, {}
    for tower, defaults in _HF_TOWER_DEFAULTS.items():
        # Configs written by older transformers versions may keep the towers under "<tower>_config_dict".
        key = f"{tower}_config" if config.get(f"{tower}_config") else f"{tower}_config_dict"
        options = {**defaults, **_section(config, key, config_path)}
        for option in defaults:
            _positive_int(options, option, None, config_path, f"{key}.")
        towers[tower], sections[tower] = options, key
        problems.extend(_hf_tower_problems(tower, options))
    if problems:
        raise CheckpointError(f"{config_path} describes a CLIP model that clip's model does not compute exactly: "
                              f"{'; '.join(problems)}. Load it with transformers instead")
    sizes = {field: (f"{sections[tower]}.{option}", towers[tower][option]) for field, tower, option in _HF_SIZES}
    vision = towers["vision"]
    # The model sees whole patches only: the image size rounded down to a multiple of the patch size.
    sizes["image_resolution"] = (f"{sections['vision']}.image_size",
                                 vision["image_size"] // vision["patch_size"] * vision["patch_size"])
    sizes["embed_dim"] = ("projection_dim",
                          _positive_int(config, "projection_dim", _HF_PROJECTION_DIM, config_path, ""))
    return sizes


def _hf_tower_problems(tower: str, options: Mapping[str, Any]) -> List[str]:
    problems = []
    activation = options.get("hidden_act", "quick_gelu")
    if activation != "quick_gelu":
        problems.append(f"the {tower} tower's activation is {reprlib.repr(activation)}, where clip's model "
                        f"computes 'quick_gelu'")
    eps = options.get("layer_norm_eps", _LAYER_NORM_EPS)
    if type(eps) not in (int, float) or not math.isclose(eps, _LAYER_NORM_EPS):
        problems.append(f"the {tower} tower's layer_norm_eps is {reprlib.repr(eps)}, where clip's model uses "
                        f"{_LAYER_NORM_EPS}")
    width, heads = options["hidden_size"], options["num_attention_heads"]
    if heads != width // HEAD_WIDTH:
        problems.append(f"the {tower} tower has {heads} attention heads for width {width}, where clip's model uses "
                        f"width // {HEAD_WIDTH} = {width // HEAD_WIDTH} heads")
    if options["intermediate_size"] != MLP_RATIO * width:
        problems.append(f"the {tower} tower's MLP is {options['intermediate_size']} wide, where clip's model uses "
                        f"{MLP_RATIO} * width = {MLP_RATIO * width}")
    if tower == "text":
        eos, end_of_text = options["eos_token_id"], options["vocab_size"] - 1
        if eos not in (_HF_LEGACY_EOS_ID, end_of_text):
            problems.append(f"text features are pooled at token id {eos}, where clip's model pools at the highest "
                            f"token id (end of text, {end_of_text})")
    return problems
