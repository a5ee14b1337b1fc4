"""The model modules and build_model: release architectures, strict keys, no random init (text path: test_text_path)."""
import pytest
import torch

from clip.model import ARCHIVE_SCALAR_KEYS, CLIP, StateDictError, build_model, convert_weights, infer_dims
from checkpoints import TINY_RN, TINY_VIT, random_state_dict, release_table

# The release models: name -> (embed, image px, vision layers, vision width, patch, text width, text heads, numbers in
# the state dict, as tests/data/state-dicts lists it).
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


def release_meta_state_dict(name: str) -> dict:
    """A meta-device state dict with the keys, shapes and dtypes of a release checkpoint."""
    return {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for key, (shape, dtype) in release_table(name).items()}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_architectures(name):
    state_dict = release_meta_state_dict(name)
    embed, px, layers, width, patch, text_width, text_heads, params = RELEASES[name]

    model = build_model(state_dict)

    dims = infer_dims(state_dict)
    assert (dims.embed_dim, dims.image_resolution, dims.vision_layers, dims.vision_width,
            dims.vision_patch_size) == (embed, px, layers, width, patch)
    assert (dims.transformer_width, dims.transformer_heads, dims.transformer_layers) == (text_width, text_heads, 12)
    assert (dims.context_length, dims.vocab_size) == (77, 49408)
    # The release tables count every tensor of the state dict (BatchNorm statistics included).
    assert sum(t.numel() for t in model.state_dict().values()) == params
    assert model.visual.input_resolution == px
    assert model.visual.output_dim == embed
    assert not model.training

    # Our own state dict has exactly the release keys, shapes and dtypes (less the archive's three scalars).
    ours = model.state_dict()
    release = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALAR_KEYS}
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
    with pytest.raises(StateDictError) as info:
        build_model({"fc.weight": torch.zeros(2, 2), "conv1.weight": torch.zeros(1, 1, 1, 1)})
    message = str(info.value)
    assert "not a CLIP state dict" in message
    assert "missing keys" in message and "token_embedding.weight" in message
    assert "unexpected keys (2): fc.weight, conv1.weight" in message


def test_missing_and_unexpected_keys_are_listed():
    state_dict = random_state_dict(TINY_VIT)
    del state_dict["visual.ln_post.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(StateDictError) as info:
        build_model(state_dict)
    message = str(info.value)
    assert "missing keys (1): visual.ln_post.bias" in message
    assert "unexpected keys (1): visual.extra_head.weight" in message


def test_a_wrong_shape_is_named():
    state_dict = random_state_dict(TINY_VIT)
    state_dict["visual.ln_pre.weight"] = torch.zeros(63)
    with pytest.raises(StateDictError, match=r"shape of visual.ln_pre.weight: expected \(64,\), got \(63,\)"):
        build_model(state_dict)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_convert_weights_matches_the_release_dtype_set(name):
    with torch.device("meta"):  # the release's architecture, without its memory
        model = CLIP(**vars(infer_dims(release_meta_state_dict(name))))
    convert_weights(model)
    half = {k for k, v in model.state_dict().items() if v.dtype == torch.float16}
    release_half = {k for k, (_, dtype) in release_table(name).items() if dtype == "float16"}
    assert half == release_half
    if name.startswith("RN"):
        assert "visual.attnpool.q_proj.weight" in half and "visual.attnpool.positional_embedding" not in half


def _float_model(dims=TINY_VIT):
    return build_model(random_state_dict(dims)).float()


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
