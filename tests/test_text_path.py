"""encode_text's trimming: the same features as the full-length computation, and full shapes whenever it might show.

The features are checked against an oracle written here, the original's full-length ``encode_text`` restated with
plain tensor operations in float64, and against open_clip's text tower on the same weights. That trimming happens
is checked by counting floating-point operations (``FlopCounter``, torch's flop formulas), never with hooks, which
turn it off.
"""
import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import clip._text_trim
import clip.model
from checkpoints import TINY_VIT, random_state_dict
from clip.model import CLIP, ResidualAttentionBlock, build_model

# Two 64-dimensional heads, so that the oracle's head split is exercised.
DIMS = dataclasses.replace(TINY_VIT, transformer_width=128, transformer_heads=2)
CONTEXT = DIMS.context_length
WIDTH = DIMS.transformer_width


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(DIMS)


@pytest.fixture
def model(state_dict):
    return build_model(state_dict).float()


def tokens(lengths, seed=0):
    """Rows of [49406, ids..., 49407, 0...] with the given numbers of ids (75 ids fill all 77 positions)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for row, n in enumerate(lengths):
        text[row, 0] = 49406
        text[row, 1:n + 1] = torch.randint(1, 49406, (n,), generator=generator)
        text[row, n + 1] = 49407
    return text


def _layer_norm(x, module):
    mean = x.mean(dim=-1, keepdim=True)
    variance = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(variance + module.eps) * module.weight.double() + module.bias.double()


def oracle(model, text):
    """The original's full-length encode_text, restated with plain tensor operations in float64.

    Each block attends under its own ``attn_mask`` (none: every position sees every other).
    """
    n, length = text.shape
    x = model.token_embedding.weight.double()[text] + model.positional_embedding.double()  # [N, L, d]
    for block in model.transformer.resblocks:
        mask = torch.zeros(length, length) if block.attn_mask is None else block.attn_mask
        heads = block.attn.num_heads
        head_width = x.shape[-1] // heads
        h = _layer_norm(x, block.ln_1)
        qkv = h @ block.attn.in_proj_weight.double().T + block.attn.in_proj_bias.double()  # [N, L, 3d]
        # [N, L, d] -> [N, heads, L, head_width] for each of q, k, v
        q, k, v = (t.reshape(n, length, heads, head_width).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(head_width) + mask.double()).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, length, -1)  # [N, heads, L, hw] -> [N, L, d]
        x = x + attended @ block.attn.out_proj.weight.double().T + block.attn.out_proj.bias.double()
        h = _layer_norm(x, block.ln_2)
        h = h @ block.mlp.c_fc.weight.double().T + block.mlp.c_fc.bias.double()
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ block.mlp.c_proj.weight.double().T + block.mlp.c_proj.bias.double()
    x = _layer_norm(x, model.ln_final)
    return x[torch.arange(n), text.argmax(dim=-1)] @ model.text_projection.double()  # [N, embed_dim]


def assert_close(got, want, tolerance=1e-5):
    error = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert error < tolerance, f"relative error {error:.2e}"


class FlopCounter(TorchDispatchMode):
    """Counts floating-point operations as ``FlopCounterMode`` does, without its global module hooks (which, as
    any global hook, turn trimming off)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def flops(function) -> int:
    with FlopCounter() as counter:
        function()
    return counter.total


def full_length_flops(model, rows):
    """The floating-point operations of the text transformer alone over all 77 positions of ``rows`` rows."""
    x = torch.randn(CONTEXT, rows, WIDTH)  # (L, N, D)
    with torch.no_grad():
        return flops(lambda: model.transformer(x))


def encode(model, text):
    with torch.no_grad():
        return model.encode_text(text)


BATCHES = {
    "mixed": [3, 0, 10, 75],  # 75 ids: a row that fills all 77 positions
    "short": [2, 5, 7, 4],
    "full": [75, 75, 75],
    "one long row": [5] * 15 + [75] + [8] * 16,
    "interleaved": [int(n) for n in torch.randint(0, 76, (40,), generator=torch.Generator().manual_seed(1))],
}


@pytest.mark.parametrize("lengths", list(BATCHES.values()), ids=list(BATCHES))
def test_features_equal_the_oracle(model, lengths):
    text = tokens(lengths)
    assert_close(encode(model, text), oracle(model, text))


def test_features_equal_open_clips_text_tower(state_dict, model):
    open_clip_model = pytest.importorskip("open_clip.model")
    weights = {k: v for k, v in state_dict.items() if k not in clip.model.ARCHIVE_SCALAR_KEYS}
    theirs = open_clip_model.build_model_from_openai_state_dict(weights, cast_dtype=torch.float32).float().eval()
    text = tokens(BATCHES["one long row"] + BATCHES["mixed"])
    with torch.no_grad():
        assert_close(encode(model, text), theirs.encode_text(text))


def test_short_captions_cost_under_30_percent_of_the_full_length(model):
    text = tokens([4, 9, 2, 7])
    trimmed = flops(lambda: encode(model, text))
    assert trimmed < 0.3 * full_length_flops(model, 4)
    model.trim_text = False
    assert flops(lambda: encode(model, text)) > full_length_flops(model, 4)


def test_a_batch_costs_the_sum_of_its_rows_lengths(model):
    """63 short captions and one row of 77 positions: run in two groups, not all 64 rows to 77 positions."""
    lengths = [6] * 40 + [75] + [9] * 23
    text = tokens(lengths)
    assert flops(lambda: encode(model, text)) < 0.3 * full_length_flops(model, len(lengths))
    assert_close(encode(model, text), oracle(model, text))


def test_trim_text_false_runs_the_full_length(model):
    model.trim_text = False
    text = tokens([3, 5])
    assert flops(lambda: encode(model, text)) > full_length_flops(model, 2)
    assert_close(encode(model, text), oracle(model, text))


def test_a_bidirectional_subclass_equals_the_oracle(state_dict):
    class Bidirectional(CLIP):
        def build_attention_mask(self):
            return torch.zeros(self.context_length, self.context_length)

    model = Bidirectional(**dataclasses.asdict(DIMS))
    model.load_state_dict({k: v.float() for k, v in state_dict.items() if k not in clip.model.ARCHIVE_SCALAR_KEYS})
    model.eval()
    text = tokens([3, 0, 10, 75])
    want = oracle(model, text)
    assert_close(encode(model, text), want)
    assert not torch.allclose(want, oracle(build_model(state_dict).float(), text))  # the mask matters


def test_a_subclass_runs_the_full_length(state_dict):
    class Subclass(CLIP):
        pass

    model = Subclass(**dataclasses.asdict(DIMS))
    model.load_state_dict({k: v.float() for k, v in state_dict.items() if k not in clip.model.ARCHIVE_SCALAR_KEYS})
    text = tokens([3, 5])
    assert flops(lambda: encode(model, text)) > full_length_flops(model, 2)


@pytest.mark.parametrize("change", ["none", "prefix", "in-place", "through .data", "one block", "float64"])
def test_a_changed_attention_mask_equals_the_oracle(model, change):
    blocks = model.transformer.resblocks
    if change == "none":
        for block in blocks:
            block.attn_mask = None  # bidirectional text attention
    elif change == "prefix":
        mask = model.build_attention_mask()
        mask[:, :20] = 0  # a prefix every position sees
        for block in blocks:
            block.attn_mask = mask
    elif change == "in-place":
        blocks[0].attn_mask[:, :20] = 0
    elif change == "through .data":
        blocks[0].attn_mask.data[:, :20] = 0  # no version counter sees this
    elif change == "one block":
        blocks[1].attn_mask = torch.zeros(CONTEXT, CONTEXT)
    elif change == "float64":  # still causal, in another dtype: trimming stays exact
        for block in blocks:
            block.attn_mask = block.attn_mask.double()
    text = tokens([3, 5, 12])
    assert_close(encode(model, text), oracle(model, text))
    if change != "float64":
        assert flops(lambda: encode(model, text)) > full_length_flops(model, 3)


def _record_sequence_lengths(monkeypatch, owner, name, seen):
    """Patch ``owner.name`` to record the size of its activation (the first tensor argument), then call it."""
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        seen.append(next(a for a in args if isinstance(a, torch.Tensor)).numel())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


PATCHES = {
    "nn.LayerNorm.forward": (torch.nn.LayerNorm, "forward"),
    "F.multi_head_attention_forward": (F, "multi_head_attention_forward"),
    "F.layer_norm": (F, "layer_norm"),
    "F.linear": (F, "linear"),
    "nn.Linear.forward": (torch.nn.Linear, "forward"),
    "nn.MultiheadAttention.forward": (torch.nn.MultiheadAttention, "forward"),
    "ResidualAttentionBlock.forward": (ResidualAttentionBlock, "forward"),
    "ResidualAttentionBlock.attention": (ResidualAttentionBlock, "attention"),
    "QuickGELU.forward": (clip.model.QuickGELU, "forward"),
}


@pytest.mark.parametrize("owner, name", list(PATCHES.values()), ids=list(PATCHES))
def test_a_patched_function_sees_77_positions(model, monkeypatch, owner, name):
    text = tokens([3, 5])  # trimmed, these rows would run 7 positions
    want = oracle(model, text)
    seen = []
    _record_sequence_lengths(monkeypatch, owner, name, seen)
    got = encode(model, text)
    assert seen and all(n % CONTEXT == 0 for n in seen)  # every activation holds all 77 positions (77 = 7 x 11)
    assert_close(got, want)


def test_a_patch_made_before_import_is_seen():
    """A patch already in place when clip is imported, and so before the first look at the functions, shows as code
    written outside torch; once it is undone, the original is seen."""
    import subprocess
    import sys

    script = """
import torch
original = torch.nn.LayerNorm.forward
torch.nn.LayerNorm.forward = lambda self, x: original(self, x)
import clip.model
from clip import _text_trim
table = _text_trim._module_types(clip.model.CLIP)
print(_text_trim._torch_patched(table))
torch.nn.LayerNorm.forward = original
print(_text_trim._torch_patched(table))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "False"], result.stderr


def test_an_overridden_attention_method_sees_the_full_mask(model):
    """Attention-map code replaces ``attention`` to keep the weights, using the block's 77 x 77 mask."""

    def attention(self, x):
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        out, self.attn_probs = self.attn(x, x, x, need_weights=True, attn_mask=mask)
        return out

    for block in model.transformer.resblocks:
        block.attention = types.MethodType(attention, block)
    encode(model, tokens([3, 5]))
    assert model.transformer.resblocks[0].attn_probs.shape == (2, CONTEXT, CONTEXT)


def test_a_wrapped_text_module_sees_full_shapes(model):
    shapes = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            shapes.append(tuple(x.shape))
            return self.inner(x)

    model.ln_final = Wrapper(model.ln_final)
    encode(model, tokens([3, 5]))
    assert shapes == [(2, CONTEXT, WIDTH)]


HOOKS = {
    "ln_final forward": lambda m, seen: m.ln_final.register_forward_hook(lambda mod, a, out: seen.append(out.shape)),
    "transformer pre": lambda m, seen: m.transformer.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape)),
    "block forward": lambda m, seen: m.transformer.resblocks[1].register_forward_hook(
        lambda mod, a, out: seen.append(out.shape)),
    "attn pre": lambda m, seen: m.transformer.resblocks[0].attn.register_forward_pre_hook(
        lambda mod, a: seen.append(a[0].shape)),
    "global forward": lambda m, seen: torch.nn.modules.module.register_module_forward_hook(
        lambda mod, a, out: seen.append(out.shape) if mod is m.ln_final else None),
    "global pre": lambda m, seen: torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, a: seen.append(a[0].shape) if mod is m.transformer else None),
}


@pytest.mark.parametrize("register", list(HOOKS.values()), ids=list(HOOKS))
def test_a_hook_sees_the_original_shapes(model, register):
    seen = []
    handle = register(model, seen)
    try:
        features = encode(model, tokens([4, 6, 1]))
    finally:
        handle.remove()
    assert seen and all(CONTEXT in shape and 3 in shape for shape in seen)
    assert seen[0] in {(3, CONTEXT, WIDTH), (CONTEXT, 3, WIDTH)}  # ln_final batch first, the transformer not
    assert_close(features, oracle(model, tokens([4, 6, 1])))


def test_vmap_works_and_equals_the_batched_call(model):
    text = tokens([3, 0, 10, 75])
    with torch.no_grad():
        mapped = torch.func.vmap(lambda t: model.encode_text(t[None])[0])(text)
    assert_close(mapped, encode(model, text))
    assert_close(mapped, oracle(model, text))


def test_gradients_equal_the_full_computations(model):
    text = tokens([3, 10, 75, 1])

    def gradients():
        model.zero_grad()
        model.encode_text(text).square().sum().backward()
        return [p.grad.clone() for p in (model.positional_embedding, model.text_projection,
                                         model.transformer.resblocks[0].attn.in_proj_weight)]

    trimmed = gradients()
    model.trim_text = False
    for got, want in zip(trimmed, gradients()):
        assert_close(got, want)


def test_nothing_trims_inside_transforms_or_graphs():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = {}

    def probe(name):
        def function(x):
            seen[name] = clip._text_trim._runs_eagerly(x)
            return x.sum()
        return function

    x = torch.ones(3)
    probe("eager")(x)
    torch.func.vmap(probe("vmap"))(torch.ones(2, 3))
    torch.func.grad(probe("grad"))(x)
    torch.jit.trace(probe("jit.trace"), (x,), check_trace=False)
    make_fx(probe("make_fx"))(x)
    torch.compile(probe("compile"), backend="eager", fullgraph=False)(x)
    with FakeTensorMode():
        probe("fake")(torch.ones(3))
    probe("meta")(torch.ones(3, device="meta"))
    assert seen == {"eager": True, "vmap": False, "grad": False, "jit.trace": False, "make_fx": False,
                    "compile": False, "fake": False, "meta": False}


def test_the_private_torch_names_exist():
    """Every private torch name the guard reads is in this torch. One gone stops trimming (see the next test): this
    test is what says so, naming it, rather than the speed-up quietly disappearing."""
    assert clip._text_trim._private_torch_missing(torch.nn.Linear(1, 1)) == []


PRIVATE_NAMES = {name.rsplit(".", 1)[-1]: name for name in clip._text_trim._PRIVATE_TORCH_NAMES}


@pytest.mark.parametrize("name", list(PRIVATE_NAMES.values()), ids=list(PRIVATE_NAMES))
def test_without_a_private_torch_name_nothing_trims(model, monkeypatch, name):
    """As in a torch without ``name`` (torch itself still reads its own, so the name is hidden from the guard)."""
    lookup = clip._text_trim._torch_attribute
    monkeypatch.setattr(clip._text_trim, "_torch_attribute",
                        lambda path: clip._text_trim._MISSING if path == name else lookup(path))
    text = tokens([3, 5])
    assert clip._text_trim._private_torch_missing(model) == [name]
    assert flops(lambda: encode(model, text)) > full_length_flops(model, 2)
    assert_close(encode(model, text), oracle(model, text))


@pytest.mark.parametrize("name", clip._text_trim._MODULE_HOOK_DICTS)
def test_a_module_without_a_hook_dict_counts_as_hooked(name):
    """(Torch's own calls need the dicts, so a module without one cannot run: only the guard's reading is checked.)"""
    module = torch.nn.Linear(1, 1)
    assert not clip._text_trim._has_hooks(module)
    delattr(module, name)
    assert clip._text_trim._has_hooks(module)
    assert clip._text_trim._private_torch_missing(module) == [f"Linear().{name}"]


class EncodeText(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text):
        return self.model.encode_text(text)


GRAPHS = {
    "jit.trace": lambda model, text: torch.jit.trace_module(model, {"encode_text": (text,)},
                                                            check_trace=False).encode_text,
    "torch.compile": lambda model, text: torch.compile(model.encode_text, backend="eager", dynamic=False),
    "torch.export": lambda model, text: torch.export.export(EncodeText(model), (text,)).module(),
}


@pytest.mark.parametrize("make", list(GRAPHS.values()), ids=list(GRAPHS))
def test_a_graph_of_a_short_batch_runs_any_batch_in_full(model, make):
    short, long = tokens([2, 3]), tokens([75, 40])
    with torch.no_grad():
        graph = make(model, short)
        graph(short)
        assert_close(graph(long), oracle(model, long))


def test_the_causal_mask_is_made_once_per_device_and_dtype(state_dict):
    """Blocks get their mask in the activations' dtype from a cache: no call copies one, attn_mask stays as built."""
    model = build_model(state_dict)  # float16 activations (the release dtypes), a float32 attn_mask
    masks = []
    handle = model.transformer.resblocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attn_mask"]), with_kwargs=True)
    try:
        for text in (tokens([3, 5]), tokens([75, 2])):
            encode(model, text)
    finally:
        handle.remove()
    assert [m.dtype for m in masks] == [torch.float16] * 2
    assert masks[0].untyped_storage().data_ptr() == masks[1].untyped_storage().data_ptr()
    mask = model.transformer.resblocks[0].attn_mask
    assert mask.dtype == torch.float32 and torch.equal(mask, torch.full((CONTEXT, CONTEXT), -math.inf).triu(1))


@pytest.mark.parametrize("trim_text", [True, False], ids=["trimmed", "full length"])
def test_a_call_compares_the_shared_mask_once_not_per_block(state_dict, monkeypatch, trim_text):
    """The blocks' activations are float16 and their attn_mask float32, so each block needs a converted mask: the
    call checks the mask the blocks share once, and the blocks take the checked one."""
    model = build_model(state_dict)
    model.trim_text = trim_text
    compared = []
    is_causal = clip._text_trim.is_causal_mask
    monkeypatch.setattr(clip._text_trim, "is_causal_mask", lambda *a: compared.append(a) or is_causal(*a))
    encode(model, tokens([3, 5]))
    assert len(model.transformer.resblocks) > 1 and len(compared) == 1


def test_a_changed_mask_in_the_release_dtypes_equals_the_oracle(state_dict):
    """Where the blocks convert their mask, a mask that is not causal is converted, not taken from the cache."""
    model = build_model(state_dict)
    model.transformer.resblocks[1].attn_mask = mask = model.build_attention_mask()
    mask[:, :20] = 0
    text = tokens([3, 5, 12])
    want = oracle(model, text)
    assert_close(encode(model, text), want, tolerance=1e-2)
    assert not torch.allclose(want, oracle(build_model(state_dict), text), rtol=1e-2, atol=1e-2)


def test_the_mask_cache_is_bounded():
    like = torch.zeros(1)
    for size in range(1, 40):
        clip._text_trim._causal_mask(size, like)
    info = clip._text_trim._cached_causal_mask.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize < 39


def test_release_dtypes_trimmed_equal_the_full_length(state_dict):
    model = build_model(state_dict)  # float16 weights, float32 LayerNorms: the CUDA release dtypes
    text = tokens([3, 0, 10, 75])
    trimmed = encode(model, text)
    model.trim_text = False
    assert trimmed.dtype == torch.float16
    assert_close(trimmed, encode(model, text), tolerance=1e-2)


def test_attn_mask_is_the_causal_mask_clients_read(model):
    masks = {id(block.attn_mask) for block in model.transformer.resblocks}
    assert len(masks) == 1  # one tensor, shared, as the original builds it
    mask = model.transformer.resblocks[0].attn_mask
    assert mask.shape == (CONTEXT, CONTEXT) and mask.device.type == "cpu"
    assert torch.equal(mask, model.build_attention_mask())
    assert all(block.attn_mask is None for block in model.visual.transformer.resblocks)
    assert not any("attn_mask" in key or "mask" in key for key in model.state_dict())


def test_transformer_called_directly_on_any_length(model):
    for length in (1, 9, CONTEXT):
        x = torch.randn(length, 2, WIDTH)  # (L, N, D), sequence first
        with torch.no_grad():
            assert model.transformer(x).shape == x.shape
    # The first positions of a causal computation do not depend on the later ones.
    x = torch.randn(CONTEXT, 2, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(model.transformer(x[:9]), model.transformer(x)[:9], rtol=1e-5, atol=1e-6)


def _counts(lengths):
    counts = [0] * CONTEXT
    for n in lengths:
        counts[n - 1] += 1
    return counts


@pytest.mark.parametrize("lengths, groups", [
    ([12] * 64, [(64, 12)]),
    ([6, 9, 12, 7] * 16, [(64, 12)]),  # padding to 12 costs less than a second group
    ([8] * 63 + [77], [(63, 8), (1, 77)]),
    ([77] * 64, [(64, 77)]),
    ([5] * 30 + [40] * 30 + [77] * 4, [(30, 5), (30, 40), (4, 77)]),
    ([5] * 30 + [6] * 30 + [77] * 4, [(60, 6), (4, 77)]),
])
def test_length_groups(lengths, groups):
    assert clip._text_trim._length_groups(_counts(lengths), overhead=256) == groups


def test_length_groups_cost_no_more_than_any_other_split():
    """Against every split into runs of the sorted distinct lengths, on small random histograms."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.choice([2, 3, 5, 9, 20, 40, 77]) for _ in range(rng.randint(1, 30))]
        overhead = rng.choice([0, 8, 24, 100])
        groups = clip._text_trim._length_groups(_counts(lengths), overhead)
        assert sum(rows for rows, _ in groups) == len(lengths)
        cost = sum(rows * length + overhead for rows, length in groups)
        distinct = sorted(set(lengths))
        for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
            other, rows = 0, 0
            for length, cut in zip(distinct, list(cuts) + [True]):
                rows += lengths.count(length)
                if cut:
                    other += rows * length + overhead
                    rows = 0
            assert cost <= other
