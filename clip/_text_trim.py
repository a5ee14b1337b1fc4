"""``encode_text`` runs each row only up to its end-of-text token where that provably computes the same features.

The claim. Under the causal mask the text transformer is causal: position ``i`` of each block's output depends only
on positions ``0..i`` of its input (attention under the mask sees no later position; LayerNorm, the linear layers,
QuickGELU and the residual sums act on each position alone), and so does position ``i`` of ``ln_final``'s output.
A row's features are that output at its end-of-text position times ``text_projection``, so they depend only on
its positions up to its end of text: rows run in groups (``_length_groups``), each group only as far as its longest
row, give the features of the full length, up to the rounding of differently shaped kernels, in the same order.

The conditions, all checked on every call; if one fails, all ``context_length`` positions run, as in the original,
and hooks and patches see its shapes:

1. ``model.trim_text`` is true, and the model is exactly the class registered with :func:`trims` (``CLIP``), not a
   subclass.
2. ``model.transformer``, every module in it and ``model.ln_final`` are exactly of a type in the table
   (``_module_types``: ``CLIP``'s own ``Transformer``, ``ResidualAttentionBlock``, ``LayerNorm`` and ``QuickGELU``,
   torch's ``nn.Sequential``, ``nn.MultiheadAttention`` and ``nn.Linear`` with its ``out_proj`` subclass), with no
   hook and no ``forward`` or ``attention`` set on the instance.
3. Every module's ``attn_mask`` is a CPU tensor equal to the causal mask of the context length (``-inf`` above the
   diagonal, 0 elsewhere), compared on the CPU so that checking never waits for a device.
4. No global module hook is registered, and what the text path calls by name (the ``forward`` and ``attention``
   methods of the table's types and their bases, and ``_TORCH_FUNCTIONS``) is the function first seen there, which
   was written by torch (a C function of torch, or Python code in a file inside the installed torch package) or by
   this package. So a patch is seen whether it was made before or after that first look.
5. The run is eager: a plain tensor, no tracing, scripting, ``torch.compile``, ``torch.export``, fake or proxy
   tensors, ``torch.func`` transform (``vmap``, ``grad``) or CUDA-graph capture.
6. This torch has every private name the checks read (``_PRIVATE_TORCH_NAMES``); without one they cannot tell.

Each block attends under the top-left corner of a causal mask made once per size, device and dtype (a bounded
cache; ``block.attn_mask`` stays the CPU tensor the model built), so no call copies a mask. Each call compares each
distinct ``attn_mask`` once, not once per block.
"""
import contextvars
import functools
import os
import types
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["attention_mask", "is_causal_mask", "text_tower", "trims"]

# --------------------------------------------------------------------------------------------------------------
# Private torch names: spelled here only, and read only through _torch_attribute. Nothing public tells whether a
# module or the process has hooks, whether a fake or proxy dispatch mode is active (make_fx, non-strict
# torch.export), whether a functorch transform (vmap, grad) holds the run, what nn.Module.__call__ runs, or the class
# of nn.MultiheadAttention's out_proj. Each is present, with the meaning used here, in torch 2.4.1, 2.14.1 and 2.15.0
# (checked). Without one the checks cannot prove that nothing observes the shapes, so nothing trims (the same
# features, more work) and tests/test_text_path.py::test_the_private_torch_names_exist fails on that torch.
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# The process-wide hook dicts (register_module_forward_hook and its kin fill them).
_GLOBAL_HOOK_DICTS = tuple("torch.nn.modules.module._global" + name for name in _MODULE_HOOK_DICTS)
_FAKE_MODE = "torch._C._TorchDispatchModeKey.FAKE"
_PROXY_MODE = "torch._C._TorchDispatchModeKey.PROXY"
_GET_DISPATCH_MODE = "torch._C._get_dispatch_mode"
_PEEK_INTERPRETER_STACK = "torch._C._functorch.peek_interpreter_stack"  # the innermost functorch transform, or None
_CALL_IMPL = "torch.nn.Module._call_impl"  # what nn.Module.__call__ runs, looked up by name
_OUT_PROJ_LINEAR = "torch.nn.modules.linear.NonDynamicallyQuantizableLinear"
_PRIVATE_TORCH_NAMES = _GLOBAL_HOOK_DICTS + (_FAKE_MODE, _PROXY_MODE, _GET_DISPATCH_MODE, _PEEK_INTERPRETER_STACK,
                                             _CALL_IMPL, _OUT_PROJ_LINEAR)
_MISSING = object()  # true, so a missing hook dict counts as holding a hook

# The torch functions the text path's modules call by name.
_TORCH_FUNCTIONS = ("torch.nn.functional.layer_norm", "torch.nn.functional.linear",
                    "torch.nn.functional.multi_head_attention_forward",
                    "torch.nn.functional.scaled_dot_product_attention", "torch.sigmoid", "torch.nn.Module.__call__",
                    _CALL_IMPL)


def _torch_attribute(name: str) -> object:
    """The object at the dotted ``name`` (``torch.`` and a path of attributes), or ``_MISSING``."""
    obj = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            break
    return obj


def _private_torch_missing(module: nn.Module) -> List[str]:
    """The private torch names the checks read that this torch lacks, ``module``'s hook dicts included."""
    missing = [name for name in _PRIVATE_TORCH_NAMES if _torch_attribute(name) is _MISSING]
    return missing + [f"{type(module).__name__}().{name}" for name in _MODULE_HOOK_DICTS
                      if not isinstance(getattr(module, name, None), dict)]


# --------------------------------------------------------------------------------------------------------------
# The table (conditions 1 and 2)

_OWN_TYPES: Dict[type, FrozenSet[type]] = {}  # model class -> its own classes on the text path (see trims)


def trims(*module_types: type) -> Callable[[type], type]:
    """Class decorator: the model class may trim, and ``module_types`` are its own classes on the text path.

    ``clip.model`` names them on ``CLIP`` (it imports this module, so this module cannot import it).
    """
    def register(model_type: type) -> type:
        _OWN_TYPES[model_type] = frozenset(module_types)
        return model_type
    return register


def _module_types(model_type: type) -> FrozenSet[type]:
    """The exact types a trimmed text path may hold; none for a class not registered (a subclass included).

    A subclass, or any other module in their place, may compute something that is not causal or observe the shapes.
    """
    own = _OWN_TYPES.get(model_type)
    if own is None:
        return frozenset()
    torch_types = (nn.Sequential, nn.MultiheadAttention, nn.Linear, _torch_attribute(_OUT_PROJ_LINEAR))
    return own | {t for t in torch_types if t is not _MISSING}


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, _MISSING) for name in _MODULE_HOOK_DICTS)


# --------------------------------------------------------------------------------------------------------------
# What the text path calls by name (condition 4)

_FIRST_SEEN: Dict[object, object] = {}  # a dotted name or (class, method name) -> the original function there


@functools.lru_cache(maxsize=8)
def _methods(table: FrozenSet[type]) -> Tuple[Tuple[type, str], ...]:
    """(class, name) of the forward and attention methods of the table's types and their bases (LayerNorm calls
    nn.LayerNorm.forward)."""
    bases = {base for cls in table for base in cls.__mro__ if issubclass(base, nn.Module) and base is not nn.Module}
    return tuple((cls, name) for cls in bases for name in ("forward", "attention") if hasattr(cls, name))


@functools.lru_cache(maxsize=None)
def _source_folders() -> Tuple[str, ...]:
    """The installed torch package and this package: where the functions the text path may call are written."""
    return tuple(os.path.realpath(os.path.dirname(path)) + os.sep for path in (torch.__file__, __file__))


def _written_by_torch_or_here(function: object) -> bool:
    """A C function of torch, or a Python function whose file lies inside torch's package or this one."""
    if isinstance(function, types.BuiltinFunctionType):
        return (function.__module__ or "").split(".")[0] == "torch"
    if not isinstance(function, types.FunctionType):
        return False  # a partial or another callable: what it runs is not known
    file = os.path.realpath(function.__code__.co_filename)
    return os.path.isfile(file) and file.startswith(_source_folders())


def _is_original(where: object, function: object) -> bool:
    original = _FIRST_SEEN.get(where)
    if original is None and _written_by_torch_or_here(function):
        original = _FIRST_SEEN.setdefault(where, function)
    return original is not None and function is original


def _torch_patched(table: FrozenSet[type]) -> bool:
    """Whether something the text path calls by name is not the original function there."""
    return not (all(_is_original(name, _torch_attribute(name)) for name in _TORCH_FUNCTIONS)
                and all(_is_original(where, getattr(*where)) for where in _methods(table)))


# --------------------------------------------------------------------------------------------------------------
# An eager run (condition 5)


def _is_recording() -> bool:
    """Whether the run is being recorded as a graph: tracing, scripting, compiling, exporting, fake or proxy
    tensors. A graph would keep one batch's lengths, and host reads of tensor values are not allowed in it."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return True
    # Public, but not in torch 2.4.1, where torch.export's strict mode compiles (is_compiling) and its non-strict
    # mode runs under the proxy and fake dispatch modes checked below.
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return True
    get_mode = _torch_attribute(_GET_DISPATCH_MODE)
    keys = [_torch_attribute(key) for key in (_FAKE_MODE, _PROXY_MODE)]
    if get_mode is _MISSING or any(key is _MISSING for key in keys):
        return True  # cannot tell: count it as recorded
    return any(get_mode(key) is not None for key in keys)


def _runs_eagerly(x: torch.Tensor) -> bool:
    """Whether ``x`` is a plain tensor of an eager run whose values the host may read: nothing records the run, no
    functorch transform holds it, no CUDA graph is being captured."""
    if type(x) is not torch.Tensor or x.device.type == "meta" or _is_recording():
        return False
    peek = _torch_attribute(_PEEK_INTERPRETER_STACK)
    if peek is _MISSING or peek() is not None:
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------------------------------------------
# Causal masks (condition 3, and the masks the blocks attend under)


def _new_causal_mask(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable by autograd even if made in inference mode
        return torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu_(1)


# A few sizes, devices and dtypes at a time (a model runs in one or two); made once, so no forward pass copies one.
_cached_causal_mask = functools.lru_cache(maxsize=16)(_new_causal_mask)


def _causal_mask(size: int, like: torch.Tensor) -> torch.Tensor:
    """The ``size x size`` causal additive mask on ``like``'s device and in its dtype; cached in an eager run (not
    for a fake tensor, a functorch level's or a CUDA graph pool's)."""
    make = _cached_causal_mask if _runs_eagerly(like) else _new_causal_mask
    return make(size, like.device, like.dtype)


def is_causal_mask(mask: object, size: Optional[int] = None) -> bool:
    """Whether ``mask`` is a CPU tensor equal to the causal additive mask (of ``size`` rows if given).

    Only CPU masks are compared, so that checking never waits for a device; a mask elsewhere counts as not causal.
    """
    if not (isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and mask.is_floating_point()
            and mask.dim() == 2 and mask.shape[0] == mask.shape[1] and size in (None, mask.shape[0])):
        return False
    return torch.equal(mask, _causal_mask(mask.shape[0], mask))


# (attn_mask, the causal mask to attend under) for each distinct mask the running encode_text call found causal.
_CHECKED_MASKS: "contextvars.ContextVar[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]]" = contextvars.ContextVar(
    "clip_checked_masks", default=())


def _checked_masks(model: nn.Module, x: torch.Tensor) -> Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]]:
    """``_CHECKED_MASKS``' value for a call on embeddings ``x``, when the run is eager and every block's mask is
    causal of the context length; else None (each block then checks its own, or converts it)."""
    blocks = getattr(model.transformer, "resblocks", None)
    if not isinstance(blocks, nn.Sequential) or not _runs_eagerly(x):
        return None
    checked: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # the blocks usually share one mask
    for block in blocks:
        mask = getattr(block, "attn_mask", None)
        if id(mask) not in checked:
            if not is_causal_mask(mask, model.context_length):
                return None
            checked[id(mask)] = (mask, _causal_mask(mask.shape[0], x))
    return tuple(checked.values())


def attention_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mask for ``x`` (L, N, D): ``mask``'s top-left L x L corner, on ``x``'s device and dtype.

    A causal mask's top-left corner is the causal mask of the shorter sequence, so any length up to the mask's
    works (trimmed rows; clients call the transformer directly). A causal mask comes from the cache; another is
    converted on every call, as the original did, and so is any mask while a graph is recorded.
    """
    length = x.shape[0]
    if mask.device != x.device or mask.dtype != x.dtype:
        checked_masks = () if torch.compiler.is_compiling() else _CHECKED_MASKS.get()  # (as in text_tower)
        causal = next((made for checked, made in checked_masks if checked is mask), None)
        if causal is not None and causal.device == x.device and causal.dtype == x.dtype:
            mask = causal
        elif not _is_recording() and is_causal_mask(mask):
            mask = _causal_mask(mask.shape[0], x)
        else:
            mask = mask[:length, :length].to(dtype=x.dtype, device=x.device)
    return mask[:length, :length]  # a view: nothing is copied


# --------------------------------------------------------------------------------------------------------------
# The text tower


def _provably_the_same(model: nn.Module, masks: Tuple[Tuple[torch.Tensor, torch.Tensor], ...]) -> bool:
    """Conditions 1, 2, 4 and 6, and 3 for every module (``masks`` holds the blocks' checked masks)."""
    table = _module_types(type(model))
    if not (model.trim_text and table) or _private_torch_missing(model):
        return False
    if any(_torch_attribute(name) for name in _GLOBAL_HOOK_DICTS) or _torch_patched(table):
        return False
    checked = {id(mask) for mask, _ in masks}
    for module in (*model.transformer.modules(), model.ln_final):
        if type(module) not in table or _has_hooks(module) or "forward" in vars(module) or "attention" in vars(module):
            return False
        if "attn_mask" in vars(module) and id(module.attn_mask) not in checked:
            return False
    return True


def text_tower(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """``model._text_tower(x, eot)`` (embeddings ``[N, L, d_model]`` -> ``[N, d_model]`` at each row's end of text
    ``eot``), with rows run only up to their end of text where this module's conditions prove it the same."""
    masks = _checked_masks(model, x)
    if masks is None:  # recorded (compiled, exported, traced) or a mask that is not causal: each block sees to its own
        return model._text_tower(x, eot)
    reset = _CHECKED_MASKS.set(masks)  # never while compiling: torch 2.4's dynamo cannot trace a ContextVar
    try:
        if x.shape[0] and _provably_the_same(model, masks):
            return _grouped(model, x, eot)
        return model._text_tower(x, eot)
    finally:
        _CHECKED_MASKS.reset(reset)


# What running one more group costs beyond its rows' positions, in row-positions (one row run one position further):
# on the CPU each group reads all the text weights once more (measured: benchmarks/README.md, "Text groups: the cost
# of one more"); on CUDA, launching a group's kernels takes as long as thousands of positions compute (an estimate).
_GROUP_OVERHEAD = {"cpu": 64, "cuda": 4096}


def _grouped(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """``model._text_tower``, with rows grouped by end-of-text position and each group run only up to its longest."""
    # The one host read of the call (a stream sync on CUDA): how many rows end at each position.
    counts = torch.bincount(eot.cpu(), minlength=x.shape[1]).tolist()  # [n_ctx]
    groups = _length_groups(counts, _GROUP_OVERHEAD.get(x.device.type, _GROUP_OVERHEAD["cuda"]))
    if len(groups) == 1:
        return model._text_tower(x[:, :groups[0][1]], eot)
    # Sorted by end of text, the rows of each group are a run of `order`; groups end between distinct positions.
    order = torch.argsort(eot)  # [N]
    parts, start = [], 0
    for rows, length in groups:
        index = order[start:start + rows]  # [rows]
        parts.append(model._text_tower(x[:, :length].index_select(0, index), eot.index_select(0, index)))
        start += rows
    return torch.cat(parts)[torch.argsort(order)]  # [N, d_model], back in the rows' order


def _length_groups(counts: Sequence[int], overhead: int) -> List[Tuple[int, int]]:
    """Split rows into groups by length so that running each group up to its longest row costs the least.

    ``counts[i]`` rows are ``i + 1`` positions long (at least one row). A group of ``r`` rows whose longest is
    ``L`` costs ``r * L + overhead``. Returns ``[(rows, L), ...]`` in increasing ``L``: sorted by length, the
    rows of each group come next.
    """
    lengths = [i + 1 for i, count in enumerate(counts) if count]
    sizes = [counts[length - 1] for length in lengths]
    total_rows, longest = sum(sizes), lengths[-1]
    if total_rows * longest - sum(n * length for n, length in zip(sizes, lengths)) <= overhead:
        return [(total_rows, longest)]  # padding every row to the longest wastes less than a second group costs
    # Over the distinct lengths in increasing order: shorter[j] rows are shorter than lengths[j]; best[j] is the
    # least cost of those rows and cut[j] the index where its last group starts.
    shorter = [0]
    for n in sizes:
        shorter.append(shorter[-1] + n)
    best, cut = [0], [0]
    for j in range(1, len(lengths) + 1):
        cost, start = min((best[i] + (shorter[j] - shorter[i]) * lengths[j - 1], i) for i in range(j))
        best.append(cost + overhead)
        cut.append(start)
    groups, j = [], len(lengths)
    while j:
        groups.append((shorter[j] - shorter[cut[j]], lengths[j - 1]))
        j = cut[j]
    return groups[::-1]
