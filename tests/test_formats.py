"""Other checkpoint formats through ``clip.load(path)``: safetensors files, open_clip and Hugging Face checkpoints.

Every model here is a tiny random one made by the tests (no downloads): features computed by our model from the
converted checkpoint must equal those of the library that saved it, to 1e-5 relative.
"""
import json
import os
import pathlib
import sys
import warnings

import pytest
import torch

from clip import _checkpoint, _layouts
from clip._checkpoint import CheckpointError
from clip._layouts import read_state_dict
from clip.clip import load
from clip.model import ARCHIVE_SCALAR_KEYS, build_model
from compare import assert_relative_close
from checkpoints import TINY_RN, TINY_VIT, random_state_dict, save_state_dict



@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Never reach the network, whatever a library tries (scoped to these tests: others serve downloads)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

WIDTH = 64  # one 64-dimensional head per tower: the smallest width our model expresses
EMBED = 32
LAYERS = 2
RESOLUTION, PATCH = 32, 16
CONTEXT, VOCAB = 77, 49408
START, END = 49406, 49407  # <|startoftext|> and <|endoftext|>


def tokens(*rows) -> torch.Tensor:
    """Hand-made token rows as ``clip.tokenize`` lays them out: start, ids, end, zero padding."""
    text = torch.zeros(len(rows), CONTEXT, dtype=torch.long)
    for i, ids in enumerate(rows):
        text[i, :len(ids) + 2] = torch.tensor([START, *ids, END])
    return text


TEXT = tokens([320, 1125, 539, 320, 2368], [1000], list(range(400, 460)))


def images(resolution: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def features(output) -> torch.Tensor:
    """A feature tensor from transformers, whose ``get_*_features`` return tensors or output objects by version."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_cpu(path):
    model, preprocess = load(str(path), device="cpu")
    return model


# --------------------------------------------------------------------------------------------------------------
# safetensors


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def release_safetensors(tmp_path) -> str:
    """A release-shaped ViT saved as a safetensors file (the golden outputs through one are in test_load)."""
    from safetensors.torch import save_file

    path = str(tmp_path / "release.safetensors")
    save_file({k: v.contiguous() for k, v in random_state_dict(TINY_VIT).items()}, path)
    return path


def _taken_for_safetensors(path, monkeypatch) -> bool:
    """Whether ``read_file`` hands ``path`` to the safetensors reader (stubbed here, so nothing is read)."""
    taken = []
    monkeypatch.setattr(_checkpoint, "read_safetensors", lambda p: taken.append(p) or {})
    try:
        _checkpoint.read_file(str(path))
    except (OSError, CheckpointError):
        pass  # refused by another check, or by the stub's empty result: only the reader's choice matters here
    return bool(taken)


def test_safetensors_files_are_recognised(release_safetensors, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    assert _taken_for_safetensors(release_safetensors, monkeypatch)
    saved = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3)}, str(saved))
    assert _taken_for_safetensors(str(saved), monkeypatch)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    assert _taken_for_safetensors(str(empty), monkeypatch)


@pytest.mark.parametrize("kind", ["zip", "legacy", "empty", "short", "overlong", "not-json", "missing", "folder"])
def test_other_files_are_not_taken_for_safetensors(tmp_path, kind, monkeypatch):
    path = tmp_path / "f"
    if kind == "zip":
        torch.save({"a": torch.zeros(3)}, str(path))
    elif kind == "legacy":
        torch.save({"a": torch.zeros(3)}, str(path), _use_new_zipfile_serialization=False)
    elif kind == "empty":
        _write(path, b"")
    elif kind == "short":
        _write(path, b"\x02\x00\x00\x00\x00\x00\x00\x00{")  # claims a 2-byte header, has 1 byte
    elif kind == "overlong":
        _write(path, (10 ** 6).to_bytes(8, "little") + b"{}" + b" " * 100)
    elif kind == "not-json":
        _write(path, (4).to_bytes(8, "little") + b"abcd")
    elif kind == "folder":
        path.mkdir()
    assert not _taken_for_safetensors(str(path), monkeypatch)


@pytest.mark.parametrize("dims", [TINY_VIT, TINY_RN], ids=["vit", "rn"])
def test_release_shaped_safetensors_file_matches_the_state_dict(tmp_path, dims):
    from safetensors.torch import save_file

    state_dict = random_state_dict(dims, seed=3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    reference = build_model(state_dict).float()
    model = load_cpu(path)
    image = images(dims.image_resolution)
    with torch.no_grad():
        assert_relative_close(model.encode_image(image), reference.encode_image(image))
        assert_relative_close(model.encode_text(TEXT), reference.encode_text(TEXT))


def test_truncated_safetensors_file_names_the_fix(tmp_path, release_safetensors, monkeypatch):
    data = pathlib.Path(release_safetensors).read_bytes()
    path = _write(tmp_path / "cut.safetensors", data[: len(data) // 2])
    with monkeypatch.context() as stubbed:
        assert _taken_for_safetensors(path, stubbed)
    with pytest.raises(CheckpointError, match="truncated: delete it and fetch it again"):
        read_state_dict(path)


def test_missing_safetensors_package_says_how_to_install(tmp_path, release_safetensors, monkeypatch):
    for name in [m for m in sys.modules if m == "safetensors" or m.startswith("safetensors.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes "import safetensors" raise ImportError
    with pytest.raises(ImportError, match=r"pip install safetensors .*clip-dropin\[safetensors\]"):
        read_state_dict(release_safetensors)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face transformers


def hf_config(text=None, vision=None, **top):
    import transformers

    tower = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                 num_attention_heads=WIDTH // 64, hidden_act="quick_gelu")
    text_config = transformers.CLIPTextConfig(**{**tower, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT,
                                                 "bos_token_id": START, "eos_token_id": END, **(text or {})})
    vision_config = transformers.CLIPVisionConfig(image_size=RESOLUTION, patch_size=PATCH,
                                                  **{**tower, **(vision or {})})
    return transformers.CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                   projection_dim=EMBED, **top)


def hf_model(config=None, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPModel(config or hf_config()).eval()
    with torch.no_grad():  # a logit scale other than the initial one, so that its mapping is tested too
        model.logit_scale.fill_(3.25)
    return model


def save_hf(model, folder, weights: str = "safetensors"):
    """``save_pretrained``; ``weights="bin"`` then replaces the safetensors file by an old-style pytorch_model.bin."""
    model.save_pretrained(str(folder))
    if weights == "bin":
        from safetensors.torch import load_file

        state_dict = load_file(str(folder / "model.safetensors"))
        # Older transformers versions also saved these index buffers; they are not weights.
        state_dict["text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]
        state_dict["vision_model.embeddings.position_ids"] = torch.arange((RESOLUTION // PATCH) ** 2 + 1)[None]
        torch.save(state_dict, str(folder / "pytorch_model.bin"))
        os.remove(folder / "model.safetensors")
    return folder


def assert_same_as_hf(ours, theirs):
    image = images(RESOLUTION)
    with torch.no_grad():
        assert_relative_close(ours.encode_image(image), features(theirs.get_image_features(pixel_values=image)))
        assert_relative_close(ours.encode_text(TEXT), features(theirs.get_text_features(input_ids=TEXT)))
        assert_relative_close(ours.logit_scale, theirs.logit_scale)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hugging_face_folder_gives_the_features_of_transformers(tmp_path, weights):
    theirs = hf_model()
    folder = save_hf(theirs, tmp_path / "hf", weights)
    ours = load_cpu(folder)
    assert ours.visual.input_resolution == RESOLUTION and ours.context_length == CONTEXT
    assert_same_as_hf(ours, theirs)


def test_hugging_face_legacy_eos_id_pools_at_the_same_token(tmp_path):
    theirs = hf_model(hf_config(text={"eos_token_id": 2}), seed=1)
    assert_same_as_hf(load_cpu(save_hf(theirs, tmp_path / "hf")), theirs)


def test_hugging_face_sharded_folder(tmp_path):
    theirs = hf_model(seed=2)
    theirs.save_pretrained(str(tmp_path / "hf"), max_shard_size="1MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert_same_as_hf(load_cpu(tmp_path / "hf"), theirs)


def test_hugging_face_weights_file_uses_the_config_beside_it(tmp_path):
    theirs = hf_model(seed=4)
    folder = save_hf(theirs, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_as_hf(load_cpu(folder / "model.safetensors"), theirs)


def test_hugging_face_state_dict_without_config_warns_and_loads(tmp_path):
    theirs = hf_model(seed=5)
    path = tmp_path / "hf.pt"
    torch.save(theirs.state_dict(), str(path))
    with pytest.warns(UserWarning, match="cannot be checked"):
        ours = load_cpu(path)
    assert_same_as_hf(ours, theirs)


def _saved_config(tmp_path, config) -> str:
    """A folder holding a config.json (and real weights of the default model, which the check refuses first)."""
    folder = save_hf(hf_model(), tmp_path / "hf")
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("change, message", [
    ({"text": {"hidden_act": "gelu"}}, "the text tower's activation is 'gelu'"),
    ({"vision": {"hidden_act": "gelu"}}, "the vision tower's activation is 'gelu'"),
    ({"vision": {"num_attention_heads": 4}}, r"4 attention heads for width 64, where .* width // 64 = 1"),
    ({"text": {"layer_norm_eps": 1e-6}}, "layer_norm_eps is 1e-06"),
    ({"text": {"eos_token_id": 7}}, "pooled at token id 7"),
    ({"text": {"intermediate_size": 128}}, "MLP is 128 wide"),
])
def test_hugging_face_architectures_we_do_not_compute_are_refused(tmp_path, change, message):
    config = hf_config().to_dict()
    for tower, options in change.items():
        config[f"{tower}_config"].update(options)
    with pytest.raises(CheckpointError, match=message):
        load_cpu(_saved_config(tmp_path, config))


@pytest.mark.parametrize("config, message", [
    ({"model_type": "siglip"}, "type 'siglip'; only 'clip'"),
    ({"model_type": "clip_text_model"}, "only the text tower"),
    ({"model_type": "clip_vision_model"}, "only the vision tower"),
])
def test_other_hugging_face_models_are_refused(tmp_path, config, message):
    with pytest.raises(CheckpointError, match=message):
        load_cpu(_saved_config(tmp_path, config))


def test_hugging_face_tensors_we_lack_are_named(tmp_path):
    state_dict = hf_model().state_dict()
    state_dict["visual_projection.bias"] = torch.zeros(EMBED)
    with pytest.raises(CheckpointError, match=r"does not have \(1\): visual_projection.bias"):
        _layouts._hf_to_openai(state_dict, "x")


def test_folder_without_weights_or_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors or pytorch_model.bin"):
        load_cpu(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="without config.json"):
        load_cpu(tmp_path)


def test_conversion_does_not_modify_its_input():
    state_dict = hf_model().state_dict()
    before = dict(state_dict)
    with pytest.warns(UserWarning, match="without its config.json"):
        converted = _layouts.to_openai_layout(state_dict, os.devnull)
    assert state_dict == before
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in converted


def test_release_layout_passes_through_unchanged():
    state_dict = random_state_dict(TINY_VIT)
    assert _layouts.to_openai_layout(state_dict, "x") is state_dict


# --------------------------------------------------------------------------------------------------------------
# open_clip


TEXT_CFG = dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=WIDTH // 64, layers=LAYERS)
VISION_CFGS = {
    "vit": dict(image_size=RESOLUTION, layers=LAYERS, width=WIDTH, patch_size=PATCH),
    "rn": dict(image_size=64, layers=[1, 1, 1, 1], width=16, patch_size=None),
}


def open_clip_model(kind: str = "vit", seed: int = 0, custom_text: bool = False, quick_gelu: bool = True,
                    vision=None, text=None, **options):
    import open_clip

    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    cfg = dict(embed_dim=EMBED, vision_cfg={**VISION_CFGS[kind], **(vision or {})},
               text_cfg={**TEXT_CFG, **(text or {})}, quick_gelu=quick_gelu, **options)
    torch.manual_seed(seed)
    model = cls(**cfg).eval()
    with torch.no_grad():  # ResNet BatchNorm statistics other than the identity, so that they are mapped too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    if custom_text:
        cfg["custom_text"] = True
    return model, cfg


def resolution(model) -> int:
    size = model.visual.image_size  # an int for ResNets, a pair for ViTs
    return size if isinstance(size, int) else size[0]


def save_open_clip_training_checkpoint(model, path):
    """The layout of open_clip's training script: epoch, name, a DataParallel-prefixed state dict, the optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(images(resolution(model), 1), TEXT[:1])[0].sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save({"epoch": 1, "name": "tiny-run", "optimizer": optimizer.state_dict(),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, str(path))
    return path


def save_open_clip_folder(model, cfg, folder):
    """``open_clip.push_to_hf_hub.save_for_hf``, with a stand-in tokenizer (the real one would be downloaded)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.push_to_hf_hub import save_for_hf

    # create_model sets these, and save_for_hf writes them into the config; the tests build the model directly.
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    class Tokenizer:
        def save_pretrained(self, directory):
            pass

    save_for_hf(model, Tokenizer(), cfg, str(folder), safe_serialization=True)
    return folder


def assert_same_as_open_clip(ours, theirs):
    image = images(resolution(theirs))
    with torch.no_grad():
        assert_relative_close(ours.encode_image(image), theirs.encode_image(image))
        assert_relative_close(ours.encode_text(TEXT), theirs.encode_text(TEXT))
        assert_relative_close(ours.logit_scale, theirs.logit_scale.reshape(()))


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_open_clip_training_checkpoint_gives_the_features_of_open_clip(tmp_path, kind):
    theirs, _ = open_clip_model(kind)
    path = save_open_clip_training_checkpoint(theirs, tmp_path / "epoch_1.pt")
    assert_same_as_open_clip(load_cpu(path), theirs.eval())


@pytest.mark.parametrize("custom_text", [False, True], ids=["clip", "custom-text"])
def test_open_clip_folder_gives_the_features_of_open_clip(tmp_path, custom_text):
    theirs, cfg = open_clip_model(seed=1, custom_text=custom_text)
    folder = save_open_clip_folder(theirs, cfg, tmp_path / "oc")
    assert_same_as_open_clip(load_cpu(folder), theirs)


def test_open_clip_persistent_attention_mask_and_vector_logit_scale(tmp_path):
    theirs, _ = open_clip_model(seed=2, nonscalar_logit_scale=True)
    state_dict = dict(theirs.state_dict(), attn_mask=theirs.attn_mask)
    path = save_state_dict(tmp_path / "oc.pt", state_dict)
    ours = load_cpu(path)
    assert ours.logit_scale.shape == ()
    assert_same_as_open_clip(ours, theirs)


def test_open_clip_folder_with_gelu_is_refused(tmp_path):
    theirs, cfg = open_clip_model(quick_gelu=False)
    folder = save_open_clip_folder(theirs, cfg, tmp_path / "oc")
    with pytest.raises(CheckpointError, match=r"GELU activations.*quick_gelu=False.*local-dir:"):
        load_cpu(folder)


@pytest.mark.parametrize("options, message", [
    (dict(init_logit_bias=-10.0), "a learned logit bias"),
    (dict(vision=dict(ls_init_value=1e-5)), "layer scale"),
    (dict(vision=dict(attentional_pool=True)), "an attentional pooler"),
    (dict(vision=dict(no_ln_pre=True)), "no LayerNorm before the image transformer"),
    (dict(text=dict(proj_bias=True)), "a bias on the text projection"),
    (dict(vision=dict(scale_attn=True)), "a custom attention block"),
])
def test_open_clip_parts_we_lack_are_named(tmp_path, options, message):
    theirs, cfg = open_clip_model(**options)
    path = save_state_dict(tmp_path / "oc.pt", theirs.state_dict())
    with pytest.raises(CheckpointError, match=f"parts that clip's model does not have: {message}"):
        load_cpu(path)
    # With its configuration, the folder is refused before the weights are read.
    folder = save_open_clip_folder(theirs, cfg, tmp_path / "oc")
    with pytest.raises(CheckpointError, match="does not compute exactly"):
        load_cpu(folder)


def test_open_clip_function_only_options_are_refused_from_the_config(tmp_path):
    theirs, cfg = open_clip_model(text=dict(pool_type="last", no_causal_mask=True))
    folder = save_open_clip_folder(theirs, cfg, tmp_path / "oc")
    with pytest.raises(CheckpointError, match=r"text_cfg.no_causal_mask=True.*text_cfg.pool_type='last'"):
        load_cpu(folder)


def test_open_clip_conversion_does_not_modify_its_input():
    theirs, _ = open_clip_model(custom_text=True)
    state_dict = theirs.state_dict()
    before = dict(state_dict)
    converted = _layouts.to_openai_layout(state_dict, "x")
    assert state_dict == before and "token_embedding.weight" in converted
    assert not set(converted) & set(ARCHIVE_SCALAR_KEYS)


def test_open_clip_two_text_towers_are_refused():
    state_dict = random_state_dict(TINY_VIT)
    state_dict["text.ln_final.weight"] = state_dict["ln_final.weight"]
    with pytest.raises(CheckpointError, match="both under 'text.' and at the top level .*text.ln_final.weight"):
        _layouts.to_openai_layout(state_dict, "x")


def test_attention_mask_other_than_causal_is_refused():
    state_dict = dict(random_state_dict(TINY_VIT), attn_mask=torch.zeros(CONTEXT, CONTEXT))
    with pytest.raises(CheckpointError, match="attn_mask is not the causal attention mask"):
        _layouts.to_openai_layout(state_dict, "x")


def _drop_from_safetensors(path, key):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path))


def test_not_a_clip_checkpoint_is_one_error_for_every_format(tmp_path):
    """A ``.pt``, a ``.safetensors``, a Hugging Face and an open_clip folder without the text projection: the same
    ``StateDictError`` (a KeyError and a RuntimeError, as the original's build_model raised), naming the path."""
    from safetensors.torch import save_file
    from clip.model import StateDictError

    weights = {k: v for k, v in random_state_dict(TINY_VIT).items()
               if k not in ARCHIVE_SCALAR_KEYS and k != "text_projection"}
    pt = save_state_dict(tmp_path / "broken.pt", weights)
    safetensors = tmp_path / "broken.safetensors"
    save_file(weights, str(safetensors))
    hf = save_hf(hf_model(), tmp_path / "hf")
    _drop_from_safetensors(hf / "model.safetensors", "text_projection.weight")
    open_clip_folder = save_open_clip_folder(*open_clip_model(), tmp_path / "oc")
    _drop_from_safetensors(open_clip_folder / "open_clip_model.safetensors", "text_projection")
    for path in (pt, safetensors, hf, open_clip_folder):
        with pytest.raises(StateDictError) as info:
            load_cpu(path)
        message = str(info.value)
        assert message.startswith(f"{path} is not a CLIP checkpoint: not a CLIP state dict: the key "
                                  f"'text_projection' is missing"), message
        assert isinstance(info.value, KeyError) and isinstance(info.value, RuntimeError)
