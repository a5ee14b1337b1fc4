"""clip.load end to end: golden outputs through every file kind and both paths, names, devices, fallbacks."""
import hashlib
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

import clip
import clip.clip
from clip import _jit
from clip._layouts import read_state_dict
from clip.model import ARCHIVE_SCALAR_KEYS
from compare import assert_relative_close
from checkpoints import TINY_VIT, random_state_dict, save_archive, save_state_dict
from httpserver import LocalServer

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ["micro-vit", "micro-rn"]
OUTPUTS = ["encode_image", "encode_text", "logits_per_image"]


@pytest.fixture(scope="module")
def golden(data_dir):
    """The original's outputs on the micro release archives (see tests/data/README.md), and the archives' paths."""
    outputs = load_file(str(data_dir / "micro" / "micro-outputs.safetensors"))
    archives = {m: str(data_dir / "micro" / f"{m}.pt") for m in MODELS}
    return outputs, archives


@pytest.fixture(scope="module")
def golden_files(golden, tmp_path_factory):
    """Each micro model as its release archive, a plain state dict, a wrapped one with a module. prefix, and a
    safetensors file."""
    from safetensors.torch import save_file

    _, archives = golden
    folder = tmp_path_factory.mktemp("golden-files")
    files = {}
    for name, archive in archives.items():
        state_dict = read_state_dict(archive)
        files[name, "archive"] = archive
        files[name, "plain"] = save_state_dict(folder / f"{name}.pth", state_dict)
        files[name, "wrapped"] = save_state_dict(folder / f"{name}.ckpt", state_dict, wrap="state_dict",
                                                 prefix="module.")
        weights = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALAR_KEYS}
        save_file(weights, str(folder / f"{name}.safetensors"))
        files[name, "safetensors"] = str(folder / f"{name}.safetensors")
    return files


def outputs_of(model, image: torch.Tensor, text: torch.Tensor) -> dict:
    with torch.no_grad():
        logits_per_image, logits_per_text = model(image, text)
        assert torch.equal(logits_per_text, logits_per_image.t())
        return {"encode_image": model.encode_image(image), "encode_text": model.encode_text(text),
                "logits_per_image": logits_per_image}


@pytest.mark.parametrize("kind", ["archive", "plain", "wrapped", "safetensors"])
@pytest.mark.parametrize("name", MODELS)
def test_golden_outputs(golden, golden_files, name, kind):
    outputs, _ = golden
    model, preprocess = clip.load(golden_files[name, kind], device="cpu")
    assert isinstance(model, clip.model.CLIP) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    image, text = outputs[f"{name}.image"], outputs[f"{name}.text"]
    got = outputs_of(model, image, text)
    for output in OUTPUTS:
        assert_relative_close(got[output], outputs[f"{name}.plain.{output}"])
    assert preprocess.transforms[0].size == image.shape[-1]


@pytest.mark.parametrize("name", MODELS)
def test_golden_outputs_through_torchscript(golden, name):
    """jit=True returns TorchScript on CPU for both release-structured archives, ViT included (float16 constant
    shared by the casts and the class token's zeros), with the original's jit=True outputs."""
    outputs, archives = golden
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        model, preprocess = clip.load(archives[name], device="cpu", jit=True)
    assert isinstance(model, torch.jit.ScriptModule)
    image, text = outputs[f"{name}.image"], outputs[f"{name}.text"]
    got = outputs_of(model, image, text)
    for output in OUTPUTS:
        assert_relative_close(got[output], outputs[f"{name}.jit.{output}"])
    assert preprocess.transforms[1].size == (image.shape[-1], image.shape[-1])


@pytest.mark.parametrize("device", ["xpu", "mps", "cuda"])
def test_jit_keeps_float16_everywhere_but_the_cpu(golden, monkeypatch, device):
    """As the original, only the CPU gets float32 casts and weights; the archive is read on the CPU here (no such
    device on this machine), so only the patching for ``device`` is under test."""
    _, archives = golden
    cpu_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda path, map_location=None: cpu_load(path, map_location="cpu"))
    model = _jit.load_jit(archives["micro-vit"], torch.device(device))
    assert model.visual.conv1.weight.dtype == torch.float16
    assert 5 in _cast_dtypes(model) and _cast_dtypes(model) == _cast_dtypes(cpu_load(archives["micro-vit"]))


def _cast_dtypes(model: torch.jit.ScriptModule) -> list:
    """The integer dtype codes (5 is float16) that the archive's ``aten::to`` casts take."""
    return [node.i("value") for graph in _jit._graphs(model) for cast in graph.findAllNodes("aten::to")
            for node in (value.node() for value in list(cast.inputs())[1:3])
            if node.kind() == "prim::Constant" and node.hasAttribute("value") and node.kindOf("value") == "i"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_jit_patches_cuda_constants_and_float16_casts(tmp_path):
    """An archive whose graphs name "cuda" and cast to float16, as releases traced on GPUs do, runs on the CPU."""
    state_dict = random_state_dict(TINY_VIT)
    path = save_archive(tmp_path / "model.pt", state_dict)
    archive = torch.jit.load(path)
    for module in archive.modules():
        for method in module._c._method_names():
            for node in module._c._get_method(method).graph.findAllNodes("prim::Constant"):
                if str(node.output().type()) == "Device":
                    node.s_("value", "cuda")
    archive.save(str(tmp_path / "cuda.pt"))
    casts = [n for n in archive._c._get_method("encode_image").graph.findAllNodes("aten::to")]
    assert casts, "the traced archive should cast its input to float16"

    model, _ = clip.load(str(tmp_path / "cuda.pt"), device="cpu", jit=True)
    plain, _ = clip.load(path, device="cpu")
    image = torch.randn(2, 3, 32, 32)
    text = torch.tensor([[49406, 320, 1929, 49407] + [0] * 73])
    with torch.no_grad():
        assert_relative_close(model.encode_image(image), plain.encode_image(image))
        assert_relative_close(model.encode_text(text), plain.encode_text(text))
    for module in model.modules():
        for method in module._c._method_names():
            for node in module._c._get_method(method).graph.findAllNodes("prim::Constant"):
                if str(node.output().type()) == "Device":
                    assert node.s("value") == "cpu"


def test_jit_on_a_plain_state_dict_falls_back_with_a_warning(tmp_path):
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    with pytest.warns(UserWarning, match="not a TorchScript archive.*jit=False"):
        model, _ = clip.load(path, device="cpu", jit=True)
    assert isinstance(model, clip.model.CLIP)


def test_jit_errors_are_raised_not_turned_into_a_plain_model(tmp_path, monkeypatch):
    """Out of memory (or any failure of TorchScript on an archive) is the caller's to see, as in the original."""
    path = save_archive(tmp_path / "model.pt", random_state_dict(TINY_VIT))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.jit, "load", out_of_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning on the way
        with pytest.raises(torch.cuda.OutOfMemoryError):
            clip.load(path, device="cpu", jit=True)


def test_positional_arguments_and_devices(tmp_path):
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    for device in ["cpu", torch.device("cpu")]:
        model, _ = clip.load(path, device, False, str(tmp_path))
        assert model.visual.conv1.weight.device.type == "cpu"


def test_default_device_is_decided_at_call_time(tmp_path, monkeypatch):
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or False)
    model, _ = clip.load(path)
    assert calls and model.dtype == torch.float32


@pytest.fixture
def served_release(tmp_path, monkeypatch, local_network):
    """A synthetic ViT-B/32 release served on 127.0.0.1 under a registry URL with its real SHA-256."""
    data = open(save_archive(tmp_path / "src.pt", random_state_dict(TINY_VIT)), "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    with LocalServer() as server:
        server.files[f"/clip/models/{digest}/ViT-B-32.pt"] = data
        monkeypatch.setitem(clip.clip._MODELS, "ViT-B/32", server.url(f"/clip/models/{digest}/ViT-B-32.pt"))
        yield server


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B-32", "vit-b/32", "VIT-B-32"])
def test_load_by_name_downloads_into_the_cache(served_release, tmp_path, name):
    model, preprocess = clip.load(name, device="cpu", download_root=str(tmp_path / "cache"))
    assert (tmp_path / "cache" / "ViT-B-32.pt").is_file()
    assert model.visual.input_resolution == 32
    requests = [r for r in served_release.requests if r[0] == "GET"]
    assert len(requests) == 1
    clip.load(name, device="cpu", download_root=str(tmp_path / "cache"))
    assert len([r for r in served_release.requests if r[0] == "GET"]) == 1  # cached: no second request


def test_registry_and_download_are_looked_up_at_call_time(tmp_path, monkeypatch):
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    calls = []

    def client_download(url, root):
        calls.append((url, root))
        return path

    monkeypatch.setattr(clip.clip, "_MODELS", {"my-model": "https://example.invalid/0/my-model.pt"})
    monkeypatch.setattr(clip.clip, "_download", client_download)
    model, _ = clip.load("my-model", device="cpu", download_root=str(tmp_path))
    assert calls == [("https://example.invalid/0/my-model.pt", str(tmp_path))]


def test_unknown_name_suggests_close_ones():
    with pytest.raises(RuntimeError, match=r"Model ViT-B/33 not found. Did you mean 'ViT-B/32'.*Available models"):
        clip.load("ViT-B/33", device="cpu")


def test_available_models_is_the_original_list():
    assert clip.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
                                       "ViT-L/14", "ViT-L/14@336px"]


def test_registry_urls_carry_their_hashes():
    for name, url in clip.clip._MODELS.items():
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/")
        digest, filename = url.split("/")[-2:]
        assert len(digest) == 64 and int(digest, 16) >= 0
        assert filename == name.replace("/", "-").replace("@", "-") + ".pt"


@pytest.mark.parametrize("save", [save_state_dict, save_archive], ids=["state-dict", "archive"])
def test_mmap_loaded_weights_survive_the_file_being_replaced(tmp_path, save):
    """Files are memory-mapped while reading; the model must own its memory afterwards."""
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in random_state_dict(TINY_VIT).items()}
    path = save(tmp_path / "weights.pth", state_dict)
    model, _ = clip.load(path, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Rewrite the file in place (same inode, as a careless copy would) and replace it (new inode).
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(0)
        f.write(b"\0" * size)
    save_state_dict(tmp_path / "other.pth", random_state_dict(TINY_VIT, seed=1))
    (tmp_path / "other.pth").replace(path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


# ----------------------------------------------------------------------------------------------------------------
# Drop-in details the original's clients rely on


def test_the_tokenizer_alias_of_the_original():
    from clip.clip import _Tokenizer
    from clip.simple_tokenizer import SimpleTokenizer

    assert _Tokenizer is SimpleTokenizer


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_path_in_the_working_directory_wins_over_a_spelling_of_a_release(tmp_path, monkeypatch, kind):
    """The original's order: an exact registry key, then an existing path, then our other spellings."""

    def no_download(url, root=None):
        raise AssertionError(f"the release was fetched instead of the local {kind}")

    monkeypatch.setattr(clip.clip, "_download", no_download)
    monkeypatch.chdir(tmp_path)
    state_dict = random_state_dict(TINY_VIT)
    if kind == "folder":  # a folder that is no checkpoint: the error comes from reading it, not from a download
        (tmp_path / "vit-b-32").mkdir()
        with pytest.raises(RuntimeError, match="^vit-b-32 is a directory"):
            clip.load("vit-b-32", device="cpu")
        return
    save_state_dict(tmp_path / "vit-b-32", state_dict)
    model, _ = clip.load("vit-b-32", device="cpu")
    assert torch.equal(model.visual.conv1.weight, state_dict["visual.conv1.weight"].float())


def test_an_exact_registry_key_wins_over_a_path(tmp_path, monkeypatch):
    calls = []
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    monkeypatch.setattr(clip.clip, "_download", lambda url, root=None: calls.append(url) or path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RN50").write_bytes(b"not a checkpoint")  # a file named like a release key
    clip.load("RN50", device="cpu")
    assert calls == [clip.clip._MODELS["RN50"]]


def test_pathlib_paths_work_wherever_strings_do(tmp_path):
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    model, _ = clip.load(pathlib.Path(path), device="cpu", download_root=tmp_path / "cache")
    assert isinstance(model, clip.model.CLIP)
    model, _ = clip.load(os.fsencode(path), device="cpu")  # a bytes path, as OpenAI's package opens it
    assert isinstance(model, clip.model.CLIP)
    missing = pathlib.Path("missing") / "model.pt"
    with pytest.raises(FileNotFoundError) as as_path:
        clip.load(missing, device="cpu")
    with pytest.raises(FileNotFoundError) as as_str:
        clip.load(str(missing), device="cpu")
    assert str(as_path.value) == str(as_str.value)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("meta", torch.float16)])
def test_float16_weights_everywhere_but_the_cpu(tmp_path, device, dtype):
    """As the original: ``str(device) == "cpu"`` is the one float32 case; CUDA, mps, xpu (and here the meta
    device, which every machine has) keep the release's float16 weights."""
    path = save_state_dict(tmp_path / "weights.pth", random_state_dict(TINY_VIT))
    model, _ = clip.load(path, device=device)
    assert model.visual.conv1.weight.device.type == device
    assert model.visual.conv1.weight.dtype == dtype and model.dtype == dtype
    assert model.ln_final.weight.dtype == torch.float32  # LayerNorms stay float32, as convert_weights leaves them


def test_a_cached_load_by_name_hashes_nothing_and_requests_nothing(served_release, tmp_path):
    """The README's promise, checked from outside: hashlib itself counts the bytes, the server counts requests."""
    code = textwrap.dedent("""
        import hashlib, sys
        hashed = [0]

        class Counting:
            def __init__(self, inner):
                self.inner = inner
            def update(self, data):
                hashed[0] += len(data)
                self.inner.update(data)
            def __getattr__(self, name):
                return getattr(self.inner, name)

        real_sha256, real_new = hashlib.sha256, hashlib.new

        def sha256(data=b"", **kwargs):
            hashed[0] += len(data)
            return Counting(real_sha256(data, **kwargs))

        def new(name, data=b"", **kwargs):
            hashed[0] += len(data)
            return Counting(real_new(name, data, **kwargs))

        def file_digest(file, name):
            digest = new(name) if isinstance(name, str) else Counting(name())
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
            return digest

        # Replaced before clip is imported, so that every way of reaching them is counted.
        hashlib.sha256, hashlib.new, hashlib.file_digest = sha256, new, file_digest

        import clip, clip.clip
        url, root = sys.argv[1], sys.argv[2]
        clip.clip._MODELS["ViT-B/32"] = url
        clip.load("ViT-B/32", device="cpu", download_root=root)  # downloads: hashes the file once
        first = hashed[0]
        clip.load("ViT-B/32", device="cpu", download_root=root)  # cached
        print(first, hashed[0] - first)
    """)
    (path,) = served_release.files
    result = subprocess.run([sys.executable, "-c", code, served_release.url(path), str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    first, cached = map(int, result.stdout.split())
    assert first == len(served_release.files[path])  # the counter works: the download hashed every byte once
    assert cached == 0
    assert len([r for r in served_release.requests if r[0] == "GET"]) == 1
