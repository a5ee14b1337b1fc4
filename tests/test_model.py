"""The model modules and build_model: release architectures, strict keys, no random init, the text fast path."""
import csv
import pathlib

import pytest
import torch

import clip.model
from clip.model import CLIP, build_model, convert_weights, infer_dims
from checkpoints import TINY_RN, TINY_VIT, random_state_dict

# Facts §1: name -> (embed, image px, vision layers, vision width, patch, text width, text heads, numbers in the
# state dict).
RELEASES = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 102_060_440),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8, 119_793_611),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10, 178_410_446),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12, 291_173_264),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16, 623_669_128),
    "ViT-B-32": (512, 224, 12, 768, 32, 512, 8, 151_277_313),
    "ViT-B-16": (512, 224, 12, 768, 16, 512, 8, 149_620_737),
    "ViT-L-14": (768, 224, 24, 1024, 14, 768, 12, 427_616_513),
    "ViT-L-14-336px": (768, 336, 24, 1024, 14, 768, 12, 427_944_193),
}
DTYPES = {"float16": torch.float16, "float32": torch.float32, "int64": torch.int64}


def read_tsv(path: pathlib.Path) -> dict:
    """A meta-device state dict with the keys, shapes and dtypes listed in a release .tsv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    state_dict = {}
    for row in rows:
        shape = [int(n) for n in row["shape"].strip("[]").split(",") if n.strip()]
        state_dict[row["key"]] = torch.empty(shape, dtype=DTYPES[row["dtype"]], device="meta")
    return state_dict


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_architectures(data_dir, name):
    state_dict = read_tsv(data_dir / "state-dicts" / f"{name}.tsv")
    embed, px, layers, width, patch, text_width, text_heads, params = RELEASES[name]

    model = build_model(state_dict)

    dims = infer_dims(state_dict)
    assert (dims.embed_dim, dims.image_resolution, dims.vision_layers, dims.vision_width,
            dims.vision_patch_size) == (embed, px, layers, width, patch)
    assert (dims.transformer_width, dims.transformer_heads, dims.transformer_layers) == (text_width, text_heads, 12)
    assert (dims.context_length, dims.vocab_size) == (77, 49408)
    # The facts table counts every tensor of the state dict (BatchNorm statistics included).
    assert sum(t.numel() for t in model.state_dict().values()) == params
    assert model.visual.input_resolution == px
    assert model.visual.output_dim == embed
    assert not model.training

    # Our own state dict has exactly the release keys, shapes and dtypes (less the archive's three scalars).
    ours = model.state_dict()
    release = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    assert set(ours) == set(release)
    for key, tensor in release.items():
        assert ours[key].shape == tensor.shape, key
        assert ours[key].dtype == tensor.dtype, key


def test_build_model_leaves_the_callers_dict_alone():
    state_dict = random_state_dict(TINY_VIT)
    before = {k: v.clone() for k, v in state_dict.items()}
    model = build_model(state_dict)
    assert set(state_dict) == set(before)
    assert all(torch.equal(state_dict[k], before[k]) for k in before)
    # The model owns copies: changing it does not reach the caller's tensors.
    with torch.no_grad():
        model.ln_final.weight.add_(1)
    assert torch.equal(state_dict["ln_final.weight"], before["ln_final.weight"])


@pytest.mark.parametrize("dims", [TINY_VIT, TINY_RN], ids=["vit", "rn"])
def test_build_model_gives_exactly_the_weights_in_release_dtypes(dims):
    state_dict = random_state_dict(dims)
    model = build_model(state_dict)
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == state_dict[key].dtype, key
        assert torch.equal(tensor, state_dict[key]), key
    assert model.dtype == torch.float16
    assert model.logit_scale.dtype == torch.float32
    assert isinstance(model.logit_scale, torch.nn.Parameter)


def test_build_model_skips_random_initialisation(monkeypatch):
    """Every initialiser the constructor calls runs on the meta device: no time spent on numbers thrown away."""
    state_dict = random_state_dict(TINY_RN)
    devices = []
    original_normal = torch.nn.init.normal_

    def recording_normal(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        return original_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording_normal)
    build_model(state_dict)
    assert devices and set(devices) == {"meta"}


def test_a_foreign_dict_is_refused_with_its_keys():
    with pytest.raises(ValueError) as info:
        build_model({"fc.weight": torch.zeros(2, 2), "conv1.weight": torch.zeros(1, 1, 1, 1)})
    message = str(info.value)
    assert "not a CLIP state dict" in message
    assert "missing keys" in message and "token_embedding.weight" in message
    assert "unexpected keys (2): fc.weight, conv1.weight" in message


def test_missing_and_unexpected_keys_are_listed():
    state_dict = random_state_dict(TINY_VIT)
    del state_dict["visual.ln_post.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        build_model(state_dict)
    message = str(info.value)
    assert "missing keys (1): visual.ln_post.bias" in message
    assert "unexpected keys (1): visual.extra_head.weight" in message


def test_a_wrong_shape_is_named():
    state_dict = random_state_dict(TINY_VIT)
    state_dict["visual.ln_pre.weight"] = torch.zeros(63)
    with pytest.raises(ValueError, match=r"shape of visual.ln_pre.weight: expected \(64,\), got \(63,\)"):
        build_model(state_dict)


def test_convert_weights_matches_the_release_dtype_set():
    model = CLIP(**vars(TINY_RN))
    convert_weights(model)
    half = {k for k, v in model.state_dict().items() if v.dtype == torch.float16}
    release_half = {k for k, v in random_state_dict(TINY_RN).items() if v.dtype == torch.float16}
    assert half == release_half
    assert "visual.attnpool.q_proj.weight" in half and "visual.attnpool.positional_embedding" not in half


def _tokens(lengths, context_length=77):
    """Rows of [49406, ids..., 49407, 0...] with the given numbers of ids."""
    text = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, n in enumerate(lengths):
        text[row, 0] = 49406
        text[row, 1:n + 1] = torch.arange(1, n + 1) * 97 % 49000 + 300
        text[row, n + 1] = 49407
    return text


def _float_model(dims=TINY_VIT):
    return build_model(random_state_dict(dims)).float()


def test_text_fast_path_equals_the_full_computation():
    model = _float_model()
    text = _tokens([3, 0, 10, 75])  # mixed lengths, including a row that fills all 77 positions
    with torch.no_grad():
        fast = model.encode_text(text)
        model.ln_final.register_forward_hook(lambda *args: None)  # any hook forces the full computation
        full = model.encode_text(text)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_short_batches_run_a_shorter_transformer():
    model = _float_model()
    seen = []
    text = _tokens([2, 5])
    with torch.no_grad():
        fast = model.encode_text(text)
        model.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
        full = model.encode_text(text)
    assert seen == [torch.Size([77, 2, 64])]  # with a hook, the original's full shape
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_ln_final_hook_sees_batch_first_full_context():
    model = _float_model()
    shapes = []
    model.ln_final.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    with torch.no_grad():
        model.encode_text(_tokens([4, 6, 1]))
    assert shapes == [torch.Size([3, 77, 64])]


def test_global_hooks_force_the_full_computation():
    model = _float_model()
    shapes = []

    def hook(module, args, output):
        if module is model.ln_final:
            shapes.append(output.shape)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            model.encode_text(_tokens([4]))
    finally:
        handle.remove()
    assert shapes == [torch.Size([1, 77, 64])]


def _full(model, text):
    """encode_text with a hook on ln_final, which forces the full 77-long computation."""
    handle = model.ln_final.register_forward_hook(lambda *args: None)
    try:
        return model.encode_text(text)
    finally:
        handle.remove()


@pytest.mark.parametrize("change", ["none", "prefix", "in-place"])
def test_a_changed_attention_mask_turns_the_shortcut_off(change):
    model = _float_model()
    text = _tokens([3, 5])
    for block in model.transformer.resblocks:
        if change == "none":
            block.attn_mask = None  # bidirectional text attention
        elif change == "prefix":
            mask = model.build_attention_mask()
            mask[:, :20] = 0  # a prefix every position sees
            block.attn_mask = mask
    if change == "in-place":
        model.transformer.resblocks[0].attn_mask[:, :20] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text), _full(model, text), rtol=0, atol=0)


def test_an_overridden_attention_method_sees_the_full_mask():
    """Attention-map code replaces ``attention`` to keep the weights, using the block's 77 x 77 mask."""
    import types

    model = _float_model()

    def attention(self, x):
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        out, self.attn_probs = self.attn(x, x, x, need_weights=True, attn_mask=mask)
        return out

    for block in model.transformer.resblocks:
        block.attention = types.MethodType(attention, block)
    with torch.no_grad():
        model.encode_text(_tokens([3, 5]))
    assert model.transformer.resblocks[0].attn_probs.shape == (2, 77, 77)


def test_patched_or_wrapped_text_modules_see_full_shapes(monkeypatch):
    model = _float_model()
    shapes = []
    original = clip.model.ResidualAttentionBlock.forward

    def patched(self, x):
        shapes.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(clip.model.ResidualAttentionBlock, "forward", patched)
    with torch.no_grad():
        model.encode_text(_tokens([3, 5]))
    assert shapes[0] == (77, 2, 64)
    monkeypatch.undo()

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            shapes.append(tuple(x.shape))
            return self.inner(x)

    model.ln_final = Wrapper(model.ln_final)
    with torch.no_grad():
        model.encode_text(_tokens([3, 5]))
    assert shapes[-1] == (2, 77, 64)


def test_transformer_called_directly_on_any_length():
    model = _float_model()
    for length in (1, 9, 77):
        x = torch.randn(length, 2, 64)  # (L, N, D), sequence first
        with torch.no_grad():
            out = model.transformer(x)
        assert out.shape == x.shape
    # The first positions of a causal computation do not depend on the later ones.
    x = torch.randn(77, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.transformer(x[:9]), model.transformer(x)[:9], rtol=1e-5, atol=1e-6)


def test_visual_proj_can_be_removed():
    model = _float_model()
    model.visual.proj = None
    with torch.no_grad():
        features = model.encode_image(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 64)  # the ViT width, unprojected


def test_the_public_module_map():
    import clip.clip
    import clip.model
    import clip.simple_tokenizer

    for name in ["CLIP", "ModifiedResNet", "VisionTransformer", "AttentionPool2d", "Bottleneck", "Transformer",
                 "ResidualAttentionBlock", "LayerNorm", "QuickGELU", "build_model", "convert_weights"]:
        assert hasattr(clip.model, name), name
    for name in ["available_models", "load", "tokenize", "_MODELS", "_download", "_transform",
                 "_convert_image_to_rgb", "BICUBIC"]:
        assert hasattr(clip.clip, name), name
    assert clip.load is clip.clip.load and clip.tokenize is clip.clip.tokenize
    assert isinstance(clip.__version__, str)
