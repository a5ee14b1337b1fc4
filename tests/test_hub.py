"""``torch.hub`` against this checkout (``source="local"``), with a synthetic checkpoint served on 127.0.0.1."""
import hashlib
import importlib.util
import pathlib

import torch
from PIL import Image

import clip
import clip.clip
from clip.model import CLIP
from checkpoints import TINY_VIT, random_state_dict, save_state_dict
from httpserver import LocalServer

REPO = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT_B_32", "ViT_B_16", "ViT_L_14",
                "ViT_L_14_336px"]


def _hubconf():
    """hubconf.py imported as torch.hub imports it (torch.hub.list and help only take GitHub repositories)."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_points_one_per_release_model_and_tokenize():
    hubconf = _hubconf()
    assert hubconf._clip is clip  # the package of this checkout, not another one on the path
    # torch.hub.list's rule: every public callable of hubconf is an entry point.
    listed = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(listed) == sorted(ENTRY_POINTS + ["tokenize"])
    assert len(ENTRY_POINTS) == len(clip.available_models())
    for module_name in hubconf.dependencies:
        assert importlib.util.find_spec(module_name) is not None


def test_entry_points_are_documented():
    hubconf = _hubconf()
    for name, release in zip(ENTRY_POINTS, clip.available_models()):
        entry = getattr(hubconf, name)
        assert entry.__name__ == name
        assert f'clip.load("{release}", ...)' in entry.__doc__ and "download_root" in entry.__doc__
    assert "Tokenize" in hubconf.tokenize.__doc__


def test_load_returns_model_and_preprocess(monkeypatch, tmp_path, local_network):
    path = save_state_dict(tmp_path / "ViT-B-32.pt", random_state_dict(TINY_VIT))
    data = pathlib.Path(path).read_bytes()
    with LocalServer() as server:
        served = f"/clip/models/{hashlib.sha256(data).hexdigest()}/ViT-B-32.pt"
        server.files[served] = data
        # hubconf imports the same clip package as this test, so it sees the patched registry.
        monkeypatch.setitem(clip.clip._MODELS, "ViT-B/32", server.url(served))
        model, preprocess = torch.hub.load(str(REPO), "ViT_B_32", source="local", device="cpu",
                                           download_root=str(tmp_path / "cache"))
    assert isinstance(model, CLIP) and not model.training
    assert (tmp_path / "cache" / "ViT-B-32.pt").read_bytes() == data
    expected, _ = clip.load(path, device="cpu")
    image = preprocess(Image.new("RGB", (50, 40), "red")).unsqueeze(0)
    text = torch.hub.load(str(REPO), "tokenize", ["a red square"], source="local")
    with torch.no_grad():
        torch.testing.assert_close(model(image, text), expected(image, text))


def test_the_tokenize_entry_point_returns_the_function_or_the_rows():
    tokenize = torch.hub.load(str(REPO), "tokenize", source="local")
    assert tokenize is clip.tokenize
    rows = torch.hub.load(str(REPO), "tokenize", ["a dog", "a cat"], source="local", truncate=True)
    assert torch.equal(rows, clip.tokenize(["a dog", "a cat"]))
