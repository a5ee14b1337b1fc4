"""Checkpoints from elsewhere: ``.safetensors`` files, open_clip and Hugging Face ``transformers`` CLIP checkpoints.

``_checkpoint.read_state_dict`` calls four functions here: :func:`is_safetensors` and :func:`read_safetensors` for
files, :func:`read_folder` for folders, and :func:`to_openai_layout` on every state dict it reads. Each layout is
mapped onto the release's key names (the names of ``clip.model``'s modules) by a small pure function:

- open_clip's ``CLIP`` with the OpenAI architecture already uses the release names; its ``CustomTextCLIP`` nests
  the same text tower under ``text.``. Both are accepted.
- Hugging Face ``CLIPModel`` names every tensor differently and keeps separate query, key and value projections;
  they are renamed and packed into ``in_proj_weight``/``in_proj_bias``.

Only checkpoints that ``clip.model.CLIP`` computes exactly are accepted: 64-dimensional attention heads, QuickGELU,
LayerNorm eps 1e-5, pooling at the end-of-text token. Features the model lacks (a logit bias, layer scale, an
attentional pooler, other towers) are named in the error. An activation leaves no trace in the weights, so a
GELU model can only be told apart when its configuration travels with it (a folder's ``config.json`` or
``open_clip_config.json``); a bare open_clip state dict is taken to use QuickGELU, as the OpenAI weights do.
"""
import json
import math
import os
import re
import struct
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch

StateDict = Dict[str, torch.Tensor]

# A safetensors file starts with the byte length of its JSON header as a little-endian uint64.
_SAFETENSORS_HEADER_LENGTH = struct.Struct("<Q")

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Sharded weights come as <weights file>.index.json, whose "weight_map" names the file holding each tensor.
_INDEX_SUFFIX = ".index.json"

# clip.model's transformers split their width into heads of this many dimensions (heads = width // 64).
_HEAD_WIDTH = 64
# clip.model's MLPs are 4x as wide as the residual stream.
_MLP_RATIO = 4
# nn.LayerNorm's default eps, which clip.model's LayerNorms use.
_LAYER_NORM_EPS = 1e-5
# transformers' pre-2023 CLIP configs say eos_token_id=2; it then pools at the highest token id, as clip does.
_HF_LEGACY_EOS_ID = 2


def _error(message: str) -> Exception:
    from ._checkpoint import CheckpointError  # lazily: _checkpoint imports this module

    return CheckpointError(message)


# --------------------------------------------------------------------------------------------------------------
# safetensors files


def is_safetensors(path: str) -> bool:
    """Whether ``path`` looks like a safetensors file, judged by its header alone.

    A safetensors file starts with an 8-byte little-endian header length, then a JSON object of that length. The
    ``safetensors`` package is not needed for the check.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_SAFETENSORS_HEADER_LENGTH.size + 1)
    except OSError:
        return False
    if len(head) < _SAFETENSORS_HEADER_LENGTH.size + 1:
        return False
    (header_length,) = _SAFETENSORS_HEADER_LENGTH.unpack(head[:_SAFETENSORS_HEADER_LENGTH.size])
    # "{}" is the shortest header; a zip or pickle file's first 8 bytes read as a length far beyond the file's size.
    fits = 2 <= header_length <= size - _SAFETENSORS_HEADER_LENGTH.size
    return fits and head[-1:] == b"{"


def read_safetensors(path: str) -> StateDict:
    """Read every tensor of a safetensors file onto the CPU.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    dict
        ``{key: tensor}`` as stored; the caller converts the layout.

    Raises
    ------
    ImportError
        When the optional ``safetensors`` package is not installed.
    CheckpointError
        When the file is damaged or truncated.
    """
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError(f"{path} is a safetensors file, and reading it needs the safetensors package: "
                          f"pip install safetensors (or pip install 'clip-dropin[safetensors]')") from e
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = os.path.getsize(path)
        raise _error(f"{path} ({size:,} bytes) is not a readable safetensors file ({type(e).__name__}: {e}). "
                     f"If it was downloaded or copied, it may be truncated: delete it and fetch it again") from e


# --------------------------------------------------------------------------------------------------------------
# folders: Hugging Face (config.json) and open_clip (open_clip_config.json)


def read_folder(path: str) -> StateDict:
    """Read a checkpoint folder into a release-layout state dict.

    Two kinds of folder are understood: open_clip's (``open_clip_config.json`` with ``open_clip_model.safetensors``
    or ``open_clip_pytorch_model.bin``, as ``open_clip.push_to_hf_hub``/``save_for_hf`` write them) and Hugging
    Face ``transformers``' (``config.json`` of ``model_type`` ``"clip"`` with ``model.safetensors`` or
    ``pytorch_model.bin``, possibly sharded, as ``CLIPModel.save_pretrained`` writes them). The configuration is
    checked first: a model that ``clip.model.CLIP`` would not compute exactly is refused.

    Raises
    ------
    IsADirectoryError
        When the folder holds neither configuration file.
    CheckpointError
        When the configuration describes an architecture that is not supported, or the weights are missing.
    """
    open_clip_config = os.path.join(path, OPEN_CLIP_CONFIG)
    if os.path.isfile(open_clip_config):
        model_cfg = _read_json(open_clip_config).get("model_cfg")
        if isinstance(model_cfg, dict):
            _check_open_clip_config(model_cfg, open_clip_config, path)
        tensors = _read_weights(path, OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG)
        return _open_clip_to_openai(tensors, path)
    hf_config = os.path.join(path, HF_CONFIG)
    if os.path.isfile(hf_config):
        _check_hf_config(_read_json(hf_config), hf_config)
        tensors = _read_weights(path, HF_WEIGHTS, HF_CONFIG)
        return _hf_to_openai(tensors, path)
    raise IsADirectoryError(
        f"{path} is a directory without {HF_CONFIG} (Hugging Face) or {OPEN_CLIP_CONFIG} (open_clip); expected a "
        f"checkpoint file (.pt, .pth, .safetensors), such a folder, or a release name from clip.available_models()")


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(f"{path} is not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(value, dict):
        raise _error(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def _read_weights(folder: str, names: Sequence[str], config_name: str) -> StateDict:
    """The tensors of the first weights file (or sharded set) of ``names`` present in ``folder``."""
    for name in names:
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            return _read_tensors(file)
        if os.path.isfile(file + _INDEX_SUFFIX):
            return _read_shards(folder, file + _INDEX_SUFFIX)
    raise _error(f"{folder} has {config_name} but no weights: expected "
                 f"{' or '.join(names)} (or a sharded {names[0]}{_INDEX_SUFFIX})")


def _read_shards(folder: str, index_path: str) -> StateDict:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _error(f"{index_path} has no weight_map; it is not a sharded-weights index")
    tensors: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        # Shards sit beside their index; a path elsewhere is refused rather than followed.
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise _error(f"{index_path} names a shard outside its folder: {shard!r}")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise _error(f"{index_path} lists the shard {shard}, which is missing from {folder}")
        tensors.update(_read_tensors(shard_path))
    return tensors


def _read_tensors(path: str) -> StateDict:
    """A weights file's flat ``{key: tensor}`` dict, as stored (safetensors or a ``torch.save`` file)."""
    from ._checkpoint import _check_is_file, _torch_load, _unwrap

    _check_is_file(path)
    if is_safetensors(path):
        return _unwrap(read_safetensors(path), path)
    return _unwrap(_torch_load(path, mmap=zipfile.is_zipfile(path)), path)


# --------------------------------------------------------------------------------------------------------------
# layout detection


def to_openai_layout(state_dict: StateDict, path: str) -> StateDict:
    """Map a state dict of a known layout onto the release's key names.

    Hugging Face ``CLIPModel`` state dicts (``text_model.*``, ``vision_model.*``) are converted; when a
    ``config.json`` lies beside the file it is checked, otherwise a warning says that the activation and head
    count could not be. open_clip state dicts are normalised (``text.`` prefix of ``CustomTextCLIP``, the causal
    ``attn_mask`` buffer, a one-element ``logit_scale``). A release-layout dict is returned as it is. The input
    dict is never modified.

    Raises
    ------
    CheckpointError
        When the state dict holds parts ``clip.model.CLIP`` lacks (the message names them).
    """
    if any(key.startswith(("text_model.", "vision_model.")) for key in state_dict):
        config = os.path.join(os.path.dirname(os.path.abspath(path)), HF_CONFIG)
        if os.path.isfile(config):
            _check_hf_config(_read_json(config), config)
        else:
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
        raise _error(f"{path} holds text-tower tensors both under 'text.' and at the top level (such as "
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
            _check_causal_mask(tensor, old, path)
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
        raise _error(f"{path} holds a model with parts that clip's model does not have: {'; '.join(found)}. Only "
                     f"the OpenAI CLIP architectures are supported; load this checkpoint with open_clip instead")


def _check_causal_mask(mask: torch.Tensor, key: str, path: str) -> None:
    n = mask.shape[0] if mask.dim() == 2 else 0
    expected = torch.full((n, n), float("-inf")).triu_(1)
    if mask.shape != (n, n) or not torch.equal(mask.float().cpu(), expected):
        raise _error(f"{path}: {key} is not the causal attention mask that clip's text transformer uses; a text "
                     f"tower with another mask is not supported")


# open_clip model_cfg options whose other values change the computation: (section, option, open_clip's default,
# the values clip.model computes, what another value means). Options not listed do not change the function.
_OPEN_CLIP_OPTIONS: Tuple[Tuple[str, str, Any, Tuple[Any, ...], str], ...] = (
    ("", "quick_gelu", False, (True,), "GELU activations, where clip's model computes QuickGELU (the activation "
                                       "OpenAI's weights were trained with)"),
    ("", "init_logit_bias", None, (None,), "a learned logit bias (a SigLIP-style sigmoid loss)"),
    ("vision_cfg", "timm_model_name", None, (None,), "a timm image tower"),
    ("vision_cfg", "head_width", _HEAD_WIDTH, (_HEAD_WIDTH,), "attention heads that are not 64-dimensional"),
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
# open_clip's text tower defaults: 512 wide, 8 heads.
_OPEN_CLIP_TEXT_DEFAULTS = {"width": 512, "heads": 8}


def _check_open_clip_config(model_cfg: Mapping[str, Any], config_path: str, folder: str) -> None:
    problems: List[str] = []
    for section, option, default, supported, what in _OPEN_CLIP_OPTIONS:
        values = model_cfg.get(section, {}) if section else model_cfg
        value = values.get(option, default) if isinstance(values, dict) else default
        if value not in supported:
            where = f"{section}.{option}" if section else option
            problems.append(f"{what} ({where}={value!r})")
    if "multimodal_cfg" in model_cfg:
        problems.append("a multimodal text decoder (CoCa)")
    text_cfg = model_cfg.get("text_cfg", {})
    if isinstance(text_cfg, dict):
        width = text_cfg.get("width", _OPEN_CLIP_TEXT_DEFAULTS["width"])
        heads = text_cfg.get("heads", _OPEN_CLIP_TEXT_DEFAULTS["heads"])
        if heads != width // _HEAD_WIDTH:
            problems.append(f"{heads} text attention heads for width {width}, where clip's model uses "
                            f"width // 64 = {width // _HEAD_WIDTH} heads (text_cfg.heads={heads})")
    if problems:
        raise _error(f"{config_path} describes an open_clip model that clip's model does not compute exactly: "
                     f"{'; '.join(problems)}. Load it with open_clip instead, e.g. "
                     f"open_clip.create_model_and_transforms('local-dir:{folder}')")


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
        shown = ", ".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else "")
        raise _error(f"{path} is a Hugging Face CLIP checkpoint with tensors that clip's model does not have "
                     f"({len(unknown)}): {shown}. Only CLIPModel with the OpenAI architecture is supported")
    for in_proj, parts in packed.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise _error(f"{path}: the {'/'.join(missing)} projection of {in_proj} is missing; the checkpoint is "
                         f"incomplete")
        # nn.MultiheadAttention packs the projections as rows [q; k; v]: (3 * width, width) or (3 * width,).
        result[in_proj] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return result


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


# transformers' CLIPTextConfig and CLIPVisionConfig defaults, for options a config.json leaves out.
_HF_TOWER_DEFAULTS = {
    "text": {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048, "vocab_size": 49408,
             "eos_token_id": 49407},
    "vision": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
}
_HF_SINGLE_TOWERS = {"clip_text_model": "text", "clip_vision_model": "vision"}


def _check_hf_config(config: Mapping[str, Any], config_path: str) -> None:
    """Refuse a Hugging Face configuration that ``clip.model.CLIP`` would not compute exactly."""
    model_type = config.get("model_type")
    if model_type in _HF_SINGLE_TOWERS:
        raise _error(f"{config_path} describes only the {_HF_SINGLE_TOWERS[model_type]} tower of a CLIP model "
                     f"({model_type}); clip.load needs both towers: save the whole CLIPModel")
    if model_type != "clip":
        raise _error(f"{config_path} describes a Hugging Face model of type {model_type!r}; only 'clip' "
                     f"(CLIPModel) checkpoints of the OpenAI architecture are supported")
    problems: List[str] = []
    for tower, defaults in _HF_TOWER_DEFAULTS.items():
        # Configs written by older transformers versions may keep the towers under "<tower>_config_dict".
        options = config.get(f"{tower}_config") or config.get(f"{tower}_config_dict") or {}
        problems.extend(_hf_tower_problems(tower, {**defaults, **options}))
    if problems:
        raise _error(f"{config_path} describes a CLIP model that clip's model does not compute exactly: "
                     f"{'; '.join(problems)}. Load it with transformers instead")


def _hf_tower_problems(tower: str, options: Mapping[str, Any]) -> List[str]:
    problems = []
    activation = options.get("hidden_act", "quick_gelu")
    if activation != "quick_gelu":
        problems.append(f"the {tower} tower's activation is {activation!r}, where clip's model computes "
                        f"'quick_gelu'")
    eps = options.get("layer_norm_eps", _LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, _LAYER_NORM_EPS):
        problems.append(f"the {tower} tower's layer_norm_eps is {eps!r}, where clip's model uses {_LAYER_NORM_EPS}")
    width, heads = options["hidden_size"], options["num_attention_heads"]
    if heads != width // _HEAD_WIDTH:
        problems.append(f"the {tower} tower has {heads} attention heads for width {width}, where clip's model uses "
                        f"width // 64 = {width // _HEAD_WIDTH} heads")
    if options["intermediate_size"] != _MLP_RATIO * width:
        problems.append(f"the {tower} tower's MLP is {options['intermediate_size']} wide, where clip's model uses "
                        f"4 * width = {_MLP_RATIO * width}")
    if tower == "text":
        eos, end_of_text = options["eos_token_id"], options["vocab_size"] - 1
        if eos not in (_HF_LEGACY_EOS_ID, end_of_text):
            problems.append(f"text features are pooled at token id {eos}, where clip's model pools at the highest "
                            f"token id (end of text, {end_of_text})")
    return problems
