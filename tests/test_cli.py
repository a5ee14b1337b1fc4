"""The ``clip`` command line on a synthetic checkpoint, a temporary cache and a download server on 127.0.0.1."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import clip.clip
from clip import _cache, _registry
from clip._cli import main
from checkpoints import TINY_VIT, random_state_dict, save_state_dict
from httpserver import LocalServer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random ViT saved as a plain state dict: every command's --model."""
    return save_state_dict(tmp_path_factory.mktemp("model") / "tiny.pt", random_state_dict(TINY_VIT))


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, preprocess = clip.load(checkpoint, device="cpu")
    return model, preprocess


def _image(path: pathlib.Path, colour: str, size=(48, 40)) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
    """Images in nested folders, in several formats, with a corrupt image and a file that is no image."""
    root = tmp_path / "photos"
    _image(root / "b.png", "red")
    _image(root / "a" / "c.JPG", "blue")
    _image(root / "a" / "z" / "d.webp", "green")
    _image(root / "e.bmp", "white")
    _image(root / "f.gif", "black")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def run(capsys, *argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------------
# The entry points, as users start them


def _subprocess(*argv):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "clip", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_python_m_clip_help_lists_every_command():
    result = _subprocess("--help")
    assert result.returncode == 0, result.stderr
    for command in ("models", "download", "verify", "classify", "embed", "merge"):
        assert command in result.stdout


def test_python_m_clip_user_error_is_one_line_without_traceback(tmp_path):
    result = _subprocess("classify", tmp_path / "missing.jpg", "--labels", "a dog")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"clip: error: image not found: {tmp_path / 'missing.jpg'}"


def test_console_script_when_installed():
    script = shutil.which("clip", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the clip console script is not installed in this environment (pip install . installs it)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"clip {clip.__version__}"


@pytest.mark.parametrize("command", ["models", "download", "verify", "classify", "embed", "merge"])
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: clip {command}")


@pytest.mark.parametrize("command", ["models", "download", "verify", "classify", "embed"])
def test_commands_take_model_and_download_root_and_device_where_a_model_runs(capsys, command):
    _, out, _ = run(capsys, command, "--help")
    for option in ("--model", "--download-root"):
        assert option in out
    assert ("--device" in out) == (command in ("classify", "embed"))


def test_no_command_prints_help_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "COMMAND" in err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, f"clip {clip.__version__}")


# ----------------------------------------------------------------------------------------------------------------
# models, download, verify, against a registry of synthetic files served on 127.0.0.1


@pytest.fixture
def registry(monkeypatch, tmp_path, local_network):
    """Two release-like entries whose URLs carry the SHA-256 of their (synthetic) bytes, served locally."""
    files = {"ViT-B/32": ("ViT-B-32.pt", b"weights of a small model" * 100), "RN50": ("RN50.pt", b"resnet" * 300)}
    with LocalServer() as server:
        models = {}
        for name, (file_name, data) in files.items():
            path = f"/clip/models/{hashlib.sha256(data).hexdigest()}/{file_name}"
            server.files[path] = data
            models[name] = server.url(path)
        monkeypatch.setattr(_registry, "MODELS", models)
        yield server, tmp_path / "cache", files


def _status_lines(out: str) -> dict:
    return {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith("cache:")}


def test_models_lists_every_release_model_with_size_and_status(capsys, tmp_path):
    code, out, _ = run(capsys, "models", "--download-root", tmp_path)
    assert code == 0
    lines = _status_lines(out)
    assert list(lines) == clip.available_models()
    assert "ViT-B-32.pt" in lines["ViT-B/32"] and "354 MB" in lines["ViT-B/32"]
    assert "1.35 GB" in lines["RN50x64"]
    assert all(line.endswith("not cached") for line in lines.values())
    assert f"cache: {tmp_path}" in out


def test_download_then_models_shows_verified_and_sizes(capsys, registry):
    server, cache, files = registry
    code, out, err = run(capsys, "download", "vit-b-32", "--download-root", cache)  # a friendly spelling
    assert code == 0, err
    assert out.strip() == f"ViT-B/32: {cache / 'ViT-B-32.pt'}"
    assert (cache / "ViT-B-32.pt").read_bytes() == files["ViT-B/32"][1]

    code, out, _ = run(capsys, "models", "--download-root", cache)
    lines = _status_lines(out)
    assert lines["ViT-B/32"].endswith("verified")
    assert "2 kB" in lines["ViT-B/32"]  # the real size of the cached file
    assert lines["RN50"].endswith("not cached")

    requests = len(server.requests)
    code, out, _ = run(capsys, "download", "ViT-B/32", "--download-root", cache)
    assert code == 0 and len(server.requests) == requests  # verified already: nothing fetched


def test_models_tells_a_planted_file_from_a_verified_one(capsys, registry):
    _, cache, files = registry
    cache.mkdir()
    (cache / "RN50.pt").write_bytes(files["RN50"][1])  # copied in by hand: no record of a verification
    _, out, _ = run(capsys, "models", "--download-root", cache)
    assert "cached, not verified yet" in _status_lines(out)["RN50"]


def test_download_all(capsys, registry):
    _, cache, files = registry
    code, out, _ = run(capsys, "download", "--all", "--download-root", cache)
    assert code == 0
    for name, data in files.values():
        assert (cache / name).read_bytes() == data
        assert _cache.cached_path(_registry.MODELS["RN50" if name == "RN50.pt" else "ViT-B/32"], cache)


def test_download_unknown_name_suggests_close_ones(capsys, registry):
    server, cache, _ = registry
    code, _, err = run(capsys, "download", "ViT-B/33", "--download-root", cache)
    assert code == 1
    assert err.startswith("clip: error: Model ViT-B/33 not found. Did you mean 'ViT-B/32'")
    assert server.requests == []


def test_download_needs_a_name(capsys, registry):
    code, _, err = run(capsys, "download")
    assert code == 2
    assert "name the models to download" in err


def test_download_failure_is_reported_and_others_continue(capsys, registry):
    server, cache, files = registry
    del server.files[next(p for p in server.files if p.endswith("RN50.pt"))]
    code, out, err = run(capsys, "download", "RN50", "ViT-B/32", "--download-root", cache)
    assert code == 1
    assert "clip: error: RN50:" in err and "404" in err
    assert out.strip() == f"ViT-B/32: {cache / 'ViT-B-32.pt'}"


def test_download_replaces_a_corrupt_file_with_a_one_line_warning(capsys, registry):
    _, cache, files = registry
    cache.mkdir()
    (cache / "RN50.pt").write_bytes(b"garbage")
    code, out, err = run(capsys, "download", "RN50", "--download-root", cache)
    assert code == 0
    assert (cache / "RN50.pt").read_bytes() == files["RN50"][1]
    assert f"clip: warning: {cache / 'RN50.pt'} does not match its expected SHA-256" in err
    assert "Warning" not in err  # no "UserWarning" with a source location


def test_verify_reports_each_file_and_fails_on_a_corrupt_one(capsys, registry):
    _, cache, files = registry
    assert run(capsys, "download", "--all", "--download-root", cache)[0] == 0
    code, out, _ = run(capsys, "verify", "--download-root", cache)
    assert code == 0
    assert f"ok      {cache / 'RN50.pt'}" in out and f"ok      {cache / 'ViT-B-32.pt'}" in out
    assert "2 file(s) checked, 0 failed" in out

    target = cache / "RN50.pt"
    stat = target.stat()
    target.write_bytes(b"X" + files["RN50"][1][1:])  # same size, same mtime: only a full re-hash sees it
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, out, _ = run(capsys, "verify", "--download-root", cache)
    assert code == 1
    assert f"FAILED  {target}: corrupt" in out
    assert "2 file(s) checked, 1 failed" in out


def test_cache_commands_narrow_to_the_model_option(capsys, registry):
    server, cache, files = registry
    code, out, err = run(capsys, "download", "--model", "rn50", "--download-root", cache)
    assert code == 0, err
    assert out.strip() == f"RN50: {cache / 'RN50.pt'}"
    assert not (cache / "ViT-B-32.pt").exists()

    code, out, _ = run(capsys, "models", "--model", "RN50", "--download-root", cache)
    assert list(_status_lines(out)) == ["RN50"] and _status_lines(out)["RN50"].endswith("verified")

    assert run(capsys, "download", "ViT-B/32", "--download-root", cache)[0] == 0
    code, out, _ = run(capsys, "verify", "--model", "ViT-B-32", "--download-root", cache)
    assert code == 0
    assert "1 file(s) checked, 0 failed" in out and "RN50.pt" not in out

    code, _, err = run(capsys, "verify", "--model", "ViT-B/33", "--download-root", cache)
    assert code == 1 and "Did you mean 'ViT-B/32'" in err


def test_verify_hashes_release_files_put_there_by_hand(capsys, registry):
    """A file placed by hand, as the download error tells users to, is hashed against the registry's SHA-256."""
    _, cache, files = registry
    cache.mkdir()
    (cache / "RN50.pt").write_bytes(files["RN50"][1])
    code, out, _ = run(capsys, "verify", "--download-root", cache)
    assert code == 0 and "ok" in out and "RN50.pt" in out and "1 file(s) checked, 0 failed" in out
    (cache / "RN50.pt").write_bytes(b"not the release")
    code, out, _ = run(capsys, "verify", "--download-root", cache)
    assert code == 1 and "FAILED" in out and "corrupt" in out and "1 file(s) checked, 1 failed" in out


def test_verify_of_a_folder_it_cannot_list_is_one_error_line(capsys, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, out, err = run(capsys, "verify", "--download-root", loop)
    assert code == 1 and out == ""
    assert err.startswith("clip: error: cannot list the cache folder") and err.count("\n") == 1, err


def test_verify_empty_cache(capsys, tmp_path):
    code, out, _ = run(capsys, "verify", "--download-root", tmp_path)
    assert code == 0
    assert out.strip() == f"no verified files in {tmp_path}"


# ----------------------------------------------------------------------------------------------------------------
# classify


def _expected_probabilities(reference, image_path, prompts):
    model, preprocess = reference
    with torch.no_grad():
        logits_per_image, _ = model(preprocess(Image.open(image_path)).unsqueeze(0), clip.tokenize(prompts))
    return logits_per_image.softmax(dim=-1)[0].tolist()


def test_classify_json_matches_the_model(capsys, checkpoint, reference, folder):
    labels = ["a dog", "a cat", "a bird"]
    code, out, err = run(capsys, "classify", folder / "b.png", "--labels", *labels, "--model", checkpoint,
                         "--device", "cpu", "--json", "--top-k", "3")
    assert code == 0, err
    (result,) = json.loads(out)
    assert result["image"] == str(folder / "b.png")
    got = {entry["label"]: entry["probability"] for entry in result["labels"]}
    expected = dict(zip(labels, _expected_probabilities(reference, folder / "b.png", labels)))
    assert got == pytest.approx(expected, abs=1e-5)
    assert [entry["probability"] for entry in result["labels"]] == sorted(got.values(), reverse=True)


def test_classify_text_output_with_top_k_and_template(capsys, checkpoint, reference, folder):
    code, out, _ = run(capsys, "classify", folder / "b.png", folder / "e.bmp", "--labels", "dog", "cat", "bird",
                       "--template", "a photo of a {}.", "--top-k", "2", "-m", checkpoint, "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == str(folder / "b.png") and lines[3] == str(folder / "e.bmp")
    expected = _expected_probabilities(reference, folder / "b.png", [f"a photo of a {x}." for x in ("dog", "cat",
                                                                                                    "bird")])
    best = max(range(3), key=expected.__getitem__)
    assert lines[1].split() == [f"{100 * expected[best]:.2f}%", ["dog", "cat", "bird"][best]]
    assert len(lines) == 6  # two labels under each of the two images


def test_classify_averages_several_templates(capsys, checkpoint, reference, folder):
    model, preprocess = reference
    labels, templates = ["dog", "cat"], ["a photo of a {}.", "a drawing of a {}."]
    argv = ["classify", folder / "b.png", "--labels", *labels, "-m", checkpoint, "--device", "cpu", "--json"]
    for template in templates:
        argv += ["--template", template]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    with torch.no_grad():
        per_template = [model.encode_text(clip.tokenize([t.format(x) for x in labels])) for t in templates]
        text = torch.stack([f / f.norm(dim=-1, keepdim=True) for f in per_template]).mean(dim=0)
        text = text / text.norm(dim=-1, keepdim=True)
        image = model.encode_image(preprocess(Image.open(folder / "b.png")).unsqueeze(0))
        image = image / image.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)[0].tolist()
    got = {e["label"]: e["probability"] for e in json.loads(out)[0]["labels"]}
    assert got == pytest.approx(dict(zip(labels, expected)), abs=1e-5)


def test_classify_labels_file_and_folder(capsys, checkpoint, folder, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\n\n  blue  \ngreen\n")
    code, out, err = run(capsys, "classify", folder, "--labels-file", labels, "-m", checkpoint, "--device", "cpu",
                         "--json")
    assert code == 1  # the broken image in the folder
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(folder / p) for p in
                                             ["a/c.JPG", "a/z/d.webp", "b.png", "broken.jpg", "e.bmp", "f.gif"]]
    broken = results[3]
    assert "labels" not in broken and broken["error"].startswith("OSError: ")
    assert all({e["label"] for e in r["labels"]} == {"red", "blue", "green"} for r in results if "labels" in r)
    assert f"clip: warning: skipping {folder / 'broken.jpg'}: cannot read it as an image" in err
    assert "clip: error: 1 of 6 image(s) could not be read" in err


def test_classify_missing_image_fails_before_loading_the_model(capsys, folder, tmp_path):
    code, out, err = run(capsys, "classify", folder / "b.png", tmp_path / "nope.jpg", "--labels", "dog",
                         "--model", tmp_path / "no-such-model.pt")
    assert (code, out) == (1, "")
    assert err == f"clip: error: image not found: {tmp_path / 'nope.jpg'}\n"


@pytest.mark.parametrize("labels, message", [
    (["--labels"], "expected at least one argument"),
    (["--labels", "dog", " "], "empty label in --labels"),
    ([], "one of the arguments --labels --labels-file is required"),
])
def test_classify_bad_labels_are_usage_errors(capsys, folder, labels, message):
    code, _, err = run(capsys, "classify", folder / "b.png", *labels)
    assert code == 2 and err.count("\n") == 1
    assert message in err and err.startswith("clip: error: ") and err.endswith("(see 'clip classify --help')\n")


def test_classify_empty_or_missing_labels_file(capsys, folder, tmp_path):
    empty = tmp_path / "labels.txt"
    empty.write_text("\n  \n")
    code, _, err = run(capsys, "classify", folder / "b.png", "--labels-file", empty)
    assert code == 2 and f"no labels in {empty}: write one label per line" in err
    code, _, err = run(capsys, "classify", folder / "b.png", "--labels-file", tmp_path / "missing.txt")
    assert code == 2 and "cannot read --labels-file" in err


def test_classify_template_needs_a_placeholder(capsys, folder):
    code, _, err = run(capsys, "classify", folder / "b.png", "--labels", "dog", "--template", "a photo")
    assert code == 2 and "has no {} for the label" in err


def test_classify_unknown_model_suggests_names(capsys, folder):
    code, out, err = run(capsys, "classify", folder / "b.png", "--labels", "dog", "--model", "vit-b-33")
    assert (code, out) == (1, "")
    assert err.startswith("clip: error: Model vit-b-33 not found. Did you mean 'ViT-B/32'")
    assert "Traceback" not in err


def test_classify_model_file_that_is_not_a_checkpoint(capsys, folder, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    code, _, err = run(capsys, "classify", folder / "b.png", "--labels", "dog", "--model", bogus, "--device", "cpu")
    assert code == 1 and err.startswith("clip: error: ") and str(bogus) in err


def test_classify_bad_device(capsys, checkpoint, folder):
    code, _, err = run(capsys, "classify", folder / "b.png", "--labels", "dog", "-m", checkpoint,
                       "--device", "toaster")
    assert code == 1 and err.startswith("clip: error: --device 'toaster'")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "classify", folder / "b.png", "--labels", "dog", "-m", checkpoint,
                           "--device", "cuda")
        assert code == 1 and "CUDA is not available here; use --device cpu" in err


# ----------------------------------------------------------------------------------------------------------------
# embed and merge


def _embed(capsys, checkpoint, source, output, *extra):
    return run(capsys, "embed", source, "--output", output, "--model", checkpoint, "--device", "cpu",
               "--batch-size", "2", "--num-workers", "0", *extra)


def _image_features(reference, paths):
    model, preprocess = reference
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def _listing_sha256(items):
    """The digest a record gives an input listing, computed here independently of clip._inputs."""
    return hashlib.sha256(b"".join(item.encode() + b"\0" for item in items)).hexdigest()


def _record(shard, count=3, checkpoint="0" * 64):
    return {"format": "clip embed record 1", "model": "m.pt", "checkpoint": "sha256:" + checkpoint,
            "inputs": {"kind": "texts", "count": count, "sha256": "ab" * 32},
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}", "options": {"precision": "fp32"},
            "computed": "float32 on cpu"}


def _hand_made_shards(stem: pathlib.Path, shards, width=4, **record):
    """Shards written as clip embed writes them: features (shard I holds the value I), row list and record."""
    for index, rows in enumerate(shards):
        name = f"{stem}.shard-{index}-of-{len(shards)}"
        np.save(name + ".npy", np.full((len(rows), width), index, np.float32))
        pathlib.Path(name + ".txt").write_text("".join(row + "\n" for row in rows))
        pathlib.Path(name + ".json").write_text(json.dumps(_record((index, len(shards)), sum(map(len, shards)),
                                                                   **record)))


def test_embed_folder(capsys, checkpoint, reference, folder, tmp_path):
    output = tmp_path / "out" / "features.npy"
    code, out, err = _embed(capsys, checkpoint, folder, output)
    assert code == 0, err
    rows = (tmp_path / "out" / "features.txt").read_text().splitlines()
    assert rows == ["a/c.JPG", "a/z/d.webp", "b.png", "e.bmp", "f.gif"]  # sorted, recursive, broken.jpg skipped
    features = np.load(output)
    assert features.dtype == np.float32 and features.shape == (5, TINY_VIT.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(features, _image_features(reference, [folder / r for r in rows]), atol=1e-5)
    assert f"clip: warning: skipping {folder / 'broken.jpg'}: cannot read it as an image" in err
    assert "5 images embedded" in err and "1 unreadable, skipped" in err
    # The record of what the rows were made from, and no temporary file or lock left.
    assert sorted(os.listdir(tmp_path / "out")) == ["features.json", "features.npy", "features.txt"]
    record = json.loads((tmp_path / "out" / "features.json").read_text())
    listing = rows[:2] + ["b.png", "broken.jpg"] + rows[3:]  # every input, the unreadable one included
    assert record["inputs"] == {"kind": "images", "count": 6, "sha256": _listing_sha256(listing)}
    assert record["checkpoint"] == "sha256:" + hashlib.sha256(pathlib.Path(checkpoint).read_bytes()).hexdigest()
    assert (record["model"], record["shard"], record["options"]) == (
        "tiny.pt", None, {"precision": "fp32", "fast_decode": False, "auto_orient": False})


def test_embed_with_worker_processes(capsys, checkpoint, reference, folder, tmp_path):
    code, _, err = run(capsys, "embed", folder, "-o", tmp_path / "f.npy", "-m", checkpoint, "--device", "cpu",
                       "--num-workers", "2", "--batch-size", "4")
    assert code == 0, err
    rows = (tmp_path / "f.txt").read_text().splitlines()
    assert len(rows) == 5 and "broken.jpg" in err
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), _image_features(reference, [folder / r for r in rows]),
                               atol=1e-5)


def test_embed_text_file(capsys, checkpoint, reference, tmp_path):
    texts = ["a photo of a dog", "", "a cat", "word " * 100]  # a blank line, and one past 77 tokens
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(texts) + "\n")
    code, _, err = _embed(capsys, checkpoint, source, tmp_path / "text.npy")
    assert code == 0, err
    rows = (tmp_path / "text.txt").read_text().splitlines()
    assert rows == ["a photo of a dog", "a cat", ("word " * 100).strip()]
    model, _ = reference
    with torch.no_grad():
        expected = model.encode_text(clip.tokenize(rows, truncate=True))
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "text.npy"), expected, atol=1e-5)


def test_embed_shards_resume_and_merge(capsys, checkpoint, folder, tmp_path, monkeypatch):
    whole = tmp_path / "whole.npy"
    assert _embed(capsys, checkpoint, folder, whole)[0] == 0
    output = tmp_path / "sharded.npy"
    for index in range(3):
        code, _, err = _embed(capsys, checkpoint, folder, output, "--shard", f"{index}/3")
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("sharded.shard-*")) == [
        f"sharded.shard-{i}-of-3.{ext}" for i in range(3) for ext in ("json", "npy", "txt")]
    # Six inputs (the broken one included) cut into slices of two; broken.jpg falls into shard 1.
    assert (tmp_path / "sharded.shard-1-of-3.txt").read_text().splitlines() == ["b.png"]

    # A finished shard is skipped on rerun, without loading a model.
    monkeypatch.setattr(clip.clip, "load", lambda *a, **k: pytest.fail("a finished shard loaded the model"))
    before = (tmp_path / "sharded.shard-0-of-3.npy").stat().st_mtime_ns
    code, _, err = _embed(capsys, checkpoint, folder, output, "--shard", "0/3")
    assert code == 0 and "shard 0/3:" in err
    assert "already exists, made from the same inputs, model and options; skipping" in err
    assert (tmp_path / "sharded.shard-0-of-3.npy").stat().st_mtime_ns == before

    code, _, err = run(capsys, "merge", output)
    assert code == 0, err
    assert (tmp_path / "sharded.txt").read_text() == (tmp_path / "whole.txt").read_text()
    np.testing.assert_array_equal(np.load(output), np.load(whole))
    assert (tmp_path / "sharded.json").read_text() == (tmp_path / "whole.json").read_text()  # one run's record


def test_embed_unfinished_shard_is_redone(capsys, checkpoint, folder, tmp_path):
    output = tmp_path / "out.npy"
    # What a run killed before its .npy leaves: its record, and perhaps its row list.
    (tmp_path / "out.shard-0-of-2.json").write_text(json.dumps(_record((0, 2))))
    (tmp_path / "out.shard-0-of-2.txt").write_text("left by a run that was killed before its .npy\n")
    code, _, err = _embed(capsys, checkpoint, folder, output, "--shard", "0/2")
    assert code == 0 and "embedded" in err
    assert (tmp_path / "out.shard-0-of-2.txt").read_text().splitlines() == ["a/c.JPG", "a/z/d.webp", "b.png"]


def test_embed_more_shards_than_inputs_is_an_error_before_any_work(capsys, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(clip.clip, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    source = tmp_path / "two.txt"
    source.write_text("a line\nanother\n")
    code, _, err = _embed(capsys, checkpoint, source, tmp_path / "o.npy", "--shard", "0/3")
    assert code == 1 and err == ("clip: error: --shard 0/3: 2 texts cannot be cut into 3 shards without empty ones; "
                                 "use at most 2\n")
    assert sorted(os.listdir(tmp_path)) == ["two.txt"]


def test_embed_existing_output_is_kept_unless_overwrite(capsys, checkpoint, folder, tmp_path):
    output = tmp_path / "f.npy"
    assert _embed(capsys, checkpoint, folder, output)[0] == 0
    before = output.stat().st_mtime_ns
    code, _, err = _embed(capsys, checkpoint, folder, output)
    assert code == 0 and "already exists, made from the same inputs, model and options; skipping (pass" in err
    assert output.stat().st_mtime_ns == before
    assert _embed(capsys, checkpoint, folder, output, "--overwrite")[0] == 0
    assert output.stat().st_mtime_ns != before


def test_merge_keeps_existing_outputs_unless_overwrite(capsys, tmp_path):
    _hand_made_shards(tmp_path / "m", [["a"], ["b", "c"]])
    assert run(capsys, "merge", tmp_path / "m.npy")[0] == 0
    np.save(tmp_path / "m.shard-0-of-2.npy", np.full((1, 4), 7, np.float32))  # a shard redone since
    code, _, err = run(capsys, "merge", tmp_path / "m.npy")
    assert code == 0 and "already exists, merged from the same shards; skipping (pass --overwrite" in err
    assert np.load(tmp_path / "m.npy")[0, 0] == 0
    assert run(capsys, "merge", tmp_path / "m.npy", "--overwrite")[0] == 0
    assert np.load(tmp_path / "m.npy")[:, 0].tolist() == [7, 1, 1]

    # A row list beside no record is not the output of a merge: never replaced.
    (tmp_path / "m.npy").unlink()
    (tmp_path / "m.json").unlink()
    (tmp_path / "m.txt").write_text("my rows\n")
    code, _, err = run(capsys, "merge", tmp_path / "m.npy")
    assert code == 1 and err.startswith(f"clip: error: {tmp_path / 'm.txt'} exists but") and "--overwrite" in err
    assert (tmp_path / "m.txt").read_text() == "my rows\n" and not (tmp_path / "m.npy").exists()


def test_merge_missing_shard(capsys, checkpoint, folder, tmp_path):
    output = tmp_path / "m.npy"
    assert _embed(capsys, checkpoint, folder, output, "--shard", "1/3")[0] == 0
    code, _, err = run(capsys, "merge", output)
    assert code == 1
    assert "2 of 3 shards are missing (I = 0, 2)" in err
    code, _, err = run(capsys, "merge", tmp_path / "nothing.npy")
    assert code == 1 and "no shards of" in err


@pytest.mark.parametrize("shard", ["3/3", "1", "-1/2", "a/b"])
def test_embed_bad_shard(capsys, folder, tmp_path, shard):
    code, _, err = run(capsys, "embed", folder, "-o", tmp_path / "x.npy", f"--shard={shard}")
    assert code == 2 and "expected I/N with 0 <= I < N" in err


def test_embed_bad_inputs(capsys, checkpoint, tmp_path):
    code, _, err = _embed(capsys, checkpoint, tmp_path / "missing", tmp_path / "x.npy")
    assert code == 1 and err == f"clip: error: input not found: {tmp_path / 'missing'}\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    code, _, err = _embed(capsys, checkpoint, empty, tmp_path / "x.npy")
    assert code == 1 and f"no images in folder {empty}" in err

    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    code, _, err = _embed(capsys, checkpoint, blank, tmp_path / "x.npy")
    assert code == 1 and f"no texts in {blank}" in err

    image = _image(tmp_path / "one.png", "red")
    code, _, err = _embed(capsys, checkpoint, image, tmp_path / "x.npy")
    assert code == 1 and "is an image; clip embed takes a folder of images or a text file" in err

    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    code, _, err = _embed(capsys, checkpoint, binary, tmp_path / "x.npy")
    assert code == 1 and "is not UTF-8 text" in err

    source = tmp_path / "lines.txt"
    source.write_text("a line\n")
    code, _, err = _embed(capsys, checkpoint, source, tmp_path / "lines.npy")
    assert code == 1 and "would overwrite the input" in err
    assert source.read_text() == "a line\n"


def test_embed_unknown_model(capsys, folder, tmp_path):
    code, _, err = run(capsys, "embed", folder, "-o", tmp_path / "x.npy", "--model", "RN5O")
    assert code == 1 and err.startswith("clip: error: Model RN5O not found.")


# ----------------------------------------------------------------------------------------------------------------
# A torch-free start for the commands that run no model


def _without_torch(tmp_path) -> dict:
    """An environment in which ``import torch`` and ``import torchvision`` fail."""
    blocker = tmp_path / "no-torch"
    for name in ("torch", "torchvision"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden from this test')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))


def test_commands_that_run_no_model_start_without_torch(tmp_path):
    env = _without_torch(tmp_path)
    _hand_made_shards(tmp_path / "f", [["a"], ["b", "c"]])
    for argv in (["--help"], ["models", "--download-root", tmp_path], ["verify", "--download-root", tmp_path],
                 ["download", "--help"], ["embed", "--help"], ["merge", tmp_path / "f.npy"], ["--version"]):
        result = subprocess.run([sys.executable, "-m", "clip", *map(str, argv)], capture_output=True, text=True,
                                cwd=REPO, env=env, timeout=120)
        assert result.returncode == 0, (argv, result.stderr)
    assert (tmp_path / "f.txt").read_text() == "a\nb\nc\n"
    # An unknown name gets load()'s suggestions from the registry, without torch.
    result = subprocess.run([sys.executable, "-m", "clip", "download", "ViT-B/33", "--download-root", tmp_path],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("clip: error: Model ViT-B/33 not found. Did you mean "
                                                               "'ViT-B/32'"), result.stderr
    # The check itself holds: a command that runs a model does need torch.
    result = subprocess.run([sys.executable, "-m", "clip", "classify", REPO / "assets" / "diagram.png", "--labels",
                             "x", "--model", REPO / "README.md"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=120)
    assert result.returncode != 0 and "torch is hidden from this test" in result.stderr


def test_a_release_missing_from_an_offline_cache_is_reported_before_torch_is_imported(tmp_path):
    """Item 9: the model is looked up in the cache first, so the error comes at once, not after importing torch."""
    env = dict(_without_torch(tmp_path), CLIP_OFFLINE="1", CLIP_CACHE_DIR=str(tmp_path / "empty-cache"))
    for argv in (["classify", REPO / "assets" / "diagram.png", "--labels", "x"],
                 ["embed", REPO / "assets", "-o", tmp_path / "f.npy"]):
        result = subprocess.run([sys.executable, "-m", "clip", *map(str, argv)], capture_output=True, text=True,
                                cwd=REPO, env=env, timeout=120)
        assert result.returncode == 1 and "torch is hidden" not in result.stderr, result.stderr
        assert result.stderr.startswith("clip: error: ") and result.stderr.count("\n") == 1
        assert "ViT-B-32.pt" in result.stderr and "--model PATH" in result.stderr


def test_import_clip_is_lazy_and_keeps_the_original_names():
    code = ("import sys, clip; assert 'torch' not in sys.modules; "
            "from clip import load, tokenize, available_models; import clip.clip, clip.model; "
            "assert clip.load is clip.clip.load and clip.model.build_model and clip.simple_tokenizer.SimpleTokenizer; "
            "assert set(dir(clip)) >= {'load', 'tokenize', 'available_models', 'clip', 'model', '__version__'}; "
            "print(clip.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == clip.__version__


# ----------------------------------------------------------------------------------------------------------------
# Progress


def _progress_model(monkeypatch, marker: str = "<encode>"):
    """clip.load, with encode_image writing ``marker`` to stderr: where it falls among the bar's redraws."""
    from clip import _console

    monkeypatch.setattr(_console, "PROGRESS_INTERVAL", 0)
    real_load = clip.clip.load

    def load(*args, **kwargs):
        model, preprocess = real_load(*args, **kwargs)
        encode = model.encode_image

        def encode_image(image):
            sys.stderr.write(marker)
            return encode(image)

        model.encode_image = encode_image
        return model, preprocess

    monkeypatch.setattr(clip.clip, "load", load)


def test_embed_progress_counts_embedded_rows(capsys, monkeypatch, checkpoint, folder, tmp_path):
    _progress_model(monkeypatch)
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "f.npy", "--progress")
    assert code == 0, err
    # Six inputs in batches of two; each batch is counted only after the model has embedded it.
    before_first_encode = err.split("<encode>")[0]
    assert "0/6" in before_first_encode and "2/6" not in before_first_encode
    counts = [int(n) for n in __import__("re").findall(r"(\d)/6 \[", err)]
    assert counts == sorted(counts) and counts[-1] == 6
    assert "image/s" in err or "s/image" in err  # the rate, and the time left beside it
    assert "5 images embedded" in err


@pytest.mark.parametrize("flags", [[], ["-q"]])
def test_embed_progress_is_quiet_when_asked_or_not_on_a_terminal(capsys, checkpoint, folder, tmp_path, flags):
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "f.npy", *flags)  # capsys: stderr is no terminal
    assert code == 0 and "/6" not in err and "\r" not in err


def test_classify_progress_bar(capsys, monkeypatch, checkpoint, folder):
    _progress_model(monkeypatch)
    code, _, err = run(capsys, "classify", folder, "--labels", "dog", "-m", checkpoint, "--device", "cpu",
                       "--batch-size", "2", "--progress")
    assert code == 1  # the broken image
    assert "0/6" in err.split("<encode>")[0] and "6/6" in err
    code, _, err = run(capsys, "classify", folder, "--labels", "dog", "-m", checkpoint, "--device", "cpu", "-q")
    assert "/6" not in err


def test_one_image_embedded_is_singular(capsys, checkpoint, tmp_path):
    _image(tmp_path / "one" / "a.png", "red")
    code, _, err = _embed(capsys, checkpoint, tmp_path / "one", tmp_path / "f.npy")
    assert code == 0 and "1 image embedded" in err


# ----------------------------------------------------------------------------------------------------------------
# Speed: decoding overlaps the model, batches travel through shared memory


def test_default_workers_decode_in_another_process(tmp_path):
    from clip import _embed

    assert _embed.default_workers(torch.device("cpu")) >= 1
    paths = [str(_image(tmp_path / f"{i}.png", "red")) for i in range(4)]
    batches = list(_embed.image_batches(paths, _record_pid_and_tensor, 2, _embed.default_workers(torch.device("cpu"))))
    assert [indices for indices, _, _ in batches] == [[0, 1], [2, 3]]
    pids = {int(value) for _, batch, _ in batches for value in batch[:, 0, 0, 0]}
    assert os.getpid() not in pids  # decoded by a worker, while the main process runs the model


def test_workers_stack_batches_into_shared_memory(tmp_path):
    """A batch made in a worker is stacked straight into shared memory, so sending it copies nothing more."""
    from torch.utils.data import DataLoader

    from clip import _embed

    paths = [str(_image(tmp_path / f"{i}.png", "red")) for i in range(4)]
    loader = DataLoader(_embed.ImageFiles(paths, _record_pid_and_tensor), batch_size=2, num_workers=1,
                        collate_fn=_collate_in_shared_memory)
    assert list(loader) == [True, True]


def _collate_in_shared_memory(items) -> bool:
    from clip import _embed

    return _embed._collate_readable(items)[1].is_shared()  # asked inside the worker, before sending


def _record_pid_and_tensor(image):
    return torch.full((3, 2, 2), float(os.getpid()))


# ----------------------------------------------------------------------------------------------------------------
# Row lists: every text and file name round-trips; outputs checked before the work


SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\x1b[31m", "\\", "\\x41"]


def test_row_list_round_trips_every_separator_in_texts(capsys, checkpoint, tmp_path):
    texts = [f"before{sep}after" for sep in SEPARATORS]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8", newline="")
    assert _embed(capsys, checkpoint, source, tmp_path / "whole.npy")[0] == 0
    from clip._outputs import read_rows

    rows = read_rows(str(tmp_path / "whole.txt"))
    # Reading the input splits at "\n" and "\r" only (universal newlines); every other separator stays in its text.
    split = SEPARATORS.index("\r")
    assert rows == texts[:split] + ["before", "after"] + texts[split + 1:]
    assert len(rows) == len(np.load(tmp_path / "whole.npy"))
    for index in range(3):
        assert _embed(capsys, checkpoint, source, tmp_path / "s.npy", "--shard", f"{index}/3")[0] == 0
    code, _, err = run(capsys, "merge", tmp_path / "s.npy")
    assert code == 0, err
    assert (tmp_path / "s.txt").read_bytes() == (tmp_path / "whole.txt").read_bytes()
    assert len((tmp_path / "whole.txt").read_text(encoding="utf-8").splitlines()) == len(rows)  # one line per row


def test_row_list_round_trips_file_names_with_separators_and_bad_bytes(capsys, checkpoint, reference, tmp_path):
    root = tmp_path / "odd"
    names = [f"x{sep}y.png" for sep in SEPARATORS if sep != "\\x41"] + ["plain.png"]
    for i, name in enumerate(names):
        _image(root / name, ["red", "blue", "green"][i % 3])
    raw = os.fsencode(str(root)) + b"/\xff\xfe-latin.png"  # a name that is not UTF-8
    Image.new("RGB", (20, 20), "white").save(raw.decode("utf-8", "surrogateescape"), format="PNG")
    code, _, err = _embed(capsys, checkpoint, root, tmp_path / "whole.npy")
    assert code == 0, err
    from clip._outputs import read_rows

    rows = read_rows(str(tmp_path / "whole.txt"))
    assert sorted(rows) == sorted(names + ["\udcff\udcfe-latin.png"])
    np.testing.assert_allclose(np.load(tmp_path / "whole.npy"), _image_features(reference, [root / r for r in rows]),
                               atol=1e-5)
    for index in range(2):
        assert _embed(capsys, checkpoint, root, tmp_path / "s.npy", "--shard", f"{index}/2")[0] == 0
    assert run(capsys, "merge", tmp_path / "s.npy")[0] == 0
    assert read_rows(str(tmp_path / "s.txt")) == rows


def test_row_format_round_trips_any_text():
    from hypothesis import given, settings, strategies as st

    from clip._outputs import decode_row, encode_row, format_rows

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
    def check(text):
        line = encode_row(text)
        assert decode_row(line) == text
        assert len(format_rows([text]).decode("utf-8").splitlines()) == 1

    check()


def test_embed_refuses_to_overwrite_either_output(capsys, checkpoint, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(clip.clip, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    labels = tmp_path / "labels.txt"
    labels.write_text("my labels\n")
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "labels.npy")
    assert code == 1 and err.startswith(f"clip: error: {labels} exists but without the record clip embed writes")
    assert "--overwrite" in err and labels.read_text() == "my labels\n"
    np.save(tmp_path / "alone.npy", np.zeros((1, 2), np.float32))
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "alone.npy")
    assert code == 1 and "alone.npy exists but" in err


def test_embed_output_that_is_a_folder_or_cannot_be_made(capsys, checkpoint, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(clip.clip, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    (tmp_path / "dir.npy").mkdir()
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "dir.npy")
    assert code == 1 and err.startswith(f"clip: error: --output: {tmp_path / 'dir.npy'} is a folder")
    (tmp_path / "file").write_text("")
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "file" / "x.npy")
    assert code == 1 and err.startswith(f"clip: error: cannot write the output into {tmp_path / 'file'}")
    assert err.count("\n") == 1


def test_embed_into_a_read_only_folder_fails_before_the_work(tmp_path, folder):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("as root, needs setpriv to give up the capabilities that ignore permissions")
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"] if os.geteuid() == 0 else []
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        result = subprocess.run(prefix + [sys.executable, "-m", "clip", "embed", str(folder), "-o",
                                          str(locked / "f.npy"), "--model", str(tmp_path / "absent.pt")],
                                capture_output=True, text=True, cwd=REPO, timeout=120,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        os.chmod(locked, 0o755)
    assert result.returncode == 1
    assert result.stderr.startswith(f"clip: error: cannot write the output into {locked}: Permission denied")


# ----------------------------------------------------------------------------------------------------------------
# Special files, hostile names, broken shards


@pytest.fixture
def alarm():
    """Fail a test that blocks (a FIFO read) instead of hanging the suite."""
    import signal

    def expired(*_):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_named_like_an_image_is_skipped(capsys, alarm, checkpoint, folder, tmp_path):
    os.mkfifo(folder / "x.png")
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "f.npy")
    assert code == 0 and f"skipping {folder / 'x.png'}: not a regular file" in err
    assert "x.png" not in (tmp_path / "f.txt").read_text()
    code, out, err = run(capsys, "classify", folder / "x.png", folder / "b.png", "--labels", "a", "b", "-m",
                         checkpoint, "--device", "cpu", "--json")
    assert code == 1 and "not a regular file" in json.loads(out)[0]["error"]


def test_classify_prints_hostile_names_safely(capsys, checkpoint, tmp_path):
    name = "evil\x1b[2J\nforged.png\n  99.99%  a dog.png"
    _image(tmp_path / name, "red")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\x1b]0;title\x07\ndog\n")
    code, out, err = run(capsys, "classify", tmp_path / name, "--labels-file", labels, "-m", checkpoint,
                         "--device", "cpu")
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0] == str(tmp_path / name).replace("\x1b", "\\x1b").replace("\n", "\\x0a")
    code, out, _ = run(capsys, "classify", tmp_path / name, "--labels-file", labels, "-m", checkpoint,
                       "--device", "cpu", "--json")
    assert "\x1b" not in out and json.loads(out)[0]["image"] == str(tmp_path / name)


@pytest.mark.parametrize("damage", ["width", "truncated", "not-utf8", "escape", "not-a-matrix"])
def test_merge_of_broken_shards_is_one_error_line(capsys, tmp_path, damage):
    _hand_made_shards(tmp_path / "m", [["a"], ["b", "c"]])
    shard = tmp_path / "m.shard-1-of-2.npy"
    if damage == "width":
        np.save(shard, np.ones((2, 8), np.float32))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-5])
    elif damage == "not-a-matrix":
        np.save(shard, np.ones(2, np.float32))
    elif damage == "not-utf8":
        (tmp_path / "m.shard-1-of-2.txt").write_bytes(b"b\n\xff\n")
    else:
        (tmp_path / "m.shard-1-of-2.txt").write_text("b\\q\nc\n")
    code, _, err = run(capsys, "merge", tmp_path / "m.npy")
    assert code == 1 and err.startswith("clip: error: ") and err.count("\n") == 1 and "m.shard-1-of-2" in err
    assert not (tmp_path / "m.npy").exists()


def test_merge_reads_a_header_claiming_terabytes_as_one_line_before_allocating(capsys, tmp_path):
    _hand_made_shards(tmp_path / "m", [["a"], ["b", "c"]], width=64)
    shard = tmp_path / "m.shard-1-of-2.npy"
    header = np.lib.format.header_data_from_array_1_0(np.ones((2, 64), np.float32))
    header["shape"] = (2 ** 40, 64)  # 256 TiB claimed, 512 bytes there
    with open(shard, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.ones((2, 64), np.float32).tobytes())
    code, _, err = run(capsys, "merge", tmp_path / "m.npy")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"clip: error: {shard} is damaged: its header describes a 1099511627776 x 64 matrix")
    assert not (tmp_path / "m.npy").exists()


@pytest.mark.parametrize("which", ["txt", "npy"])
def test_merge_refuses_a_fifo_at_a_shard_name_without_blocking(capsys, alarm, tmp_path, which):
    _hand_made_shards(tmp_path / "m", [["a"], ["b", "c"]])
    shard = tmp_path / f"m.shard-0-of-2.{which}"
    shard.unlink()
    os.mkfifo(shard)
    code, _, err = run(capsys, "merge", tmp_path / "m.npy")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"clip: error: cannot read {shard}") and "not a regular file" in err


def test_the_readmes_first_command_classifies_an_image_the_repository_ships(capsys, checkpoint):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = readme.split("```bash\n", 1)[1].split("\n", 1)[0]  # the first shell block's first line
    words = __import__("shlex").split(command.split(".venv/bin/clip ", 1)[1])
    assert words[0] == "classify" and (REPO / words[1]).is_file()
    code, out, err = run(capsys, *words[:1], REPO / words[1], *words[2:], "--model", checkpoint, "--device", "cpu")
    assert code == 0, err
    assert out.splitlines()[0] == str(REPO / words[1]) and len(out.splitlines()) == 4  # the image, three labels


# ----------------------------------------------------------------------------------------------------------------
# Write errors, unreadable inputs, named warnings


def _clip_with_file_size_limit(limit, *argv):
    """``python -m clip ARGV`` in a child that may write no file past ``limit`` bytes (RLIMIT_FSIZE: like a full
    disk, a write past it fails, with EFBIG; Python ignores the SIGXFSZ that comes with it)."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "clip", *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300, preexec_fn=None if limit is None else limit_file_size)


@pytest.mark.parametrize("limit, failing", [(8192, "texts.npy"), (1000, "texts.txt"), (100, "texts.json")])
def test_embed_that_cannot_write_its_outputs_is_one_error_line_and_leaves_nothing(checkpoint, tmp_path, limit,
                                                                                   failing):
    source = tmp_path / "captions.txt"
    source.write_text("".join(f"caption {n}\n" for n in range(200)))  # row list 2.5 kB, features 200 x dim floats
    out = tmp_path / "out"
    argv = ["embed", source, "-o", out / "texts.npy", "-m", checkpoint, "--device", "cpu", "-q"]
    result = _clip_with_file_size_limit(limit, *argv)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"clip: error: cannot write {out / failing}: File too large;")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert os.listdir(out) == []  # no lone row list (the rerun would refuse it), no temporary file
    result = _clip_with_file_size_limit(None, *argv)
    assert result.returncode == 0, result.stderr
    assert np.load(out / "texts.npy").shape == (200, TINY_VIT.embed_dim)
    assert sorted(os.listdir(out)) == ["texts.json", "texts.npy", "texts.txt"]


def test_merge_that_cannot_write_its_outputs_is_one_error_line_and_leaves_nothing(tmp_path):
    _hand_made_shards(tmp_path / "m", [[f"row {n}" for n in range(100)]] * 2, width=16)
    before = sorted(os.listdir(tmp_path))
    result = _clip_with_file_size_limit(8192, "merge", tmp_path / "m.npy")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"clip: error: cannot write {tmp_path / 'm.npy'}: File too large;")
    assert sorted(os.listdir(tmp_path)) == before
    result = _clip_with_file_size_limit(None, "merge", tmp_path / "m.npy")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "m.npy").shape == (200, 16) and len((tmp_path / "m.txt").read_text().split()) == 400


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_run(capsys, checkpoint, folder, tmp_path):
    left = ["f.npy.0123456789ab.tmp", "f.txt.abcdef012345.tmp"]
    kept = ["f.npy.notours.tmp", "g.npy.0123456789ab.tmp"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"half written")
    assert _embed(capsys, checkpoint, folder, tmp_path / "f.npy")[0] == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["f.json", "f.npy", "f.txt", "photos", *kept])


def test_embed_of_a_folder_where_no_image_can_be_read_fails_and_writes_nothing(capsys, checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in range(5):
        (bad / f"{n}.png").write_bytes(b"not a png %d" % n)
    for shard in ([], ["--shard", "0/1"]):
        code, _, err = _embed(capsys, checkpoint, bad, tmp_path / "out" / "f.npy", *shard)
        assert code == 1
        error = [line for line in err.splitlines() if line.startswith("clip: error:")]
        assert len(error) == 1 and err.count("clip: warning: skipping") == 5
        assert "none of the 5 images could be read, so nothing was written (0.png: UnidentifiedImageError: " in error[0]
        assert "2.png: " in error[0] and "3.png: " not in error[0] and "; ...)" in error[0]
        assert os.listdir(tmp_path / "out") == []  # a rerun does the work again instead of skipping it


def test_warnings_and_errors_about_an_image_name_it(capsys, checkpoint, folder, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # the 48 x 40 images are "bombs", below twice that
    (folder / "junk.png").write_bytes(b"no image format starts like this")
    code, _, err = _embed(capsys, checkpoint, folder, tmp_path / "f.npy")
    assert code == 0, err
    for name in ("b.png", "a/c.JPG", "e.bmp"):
        assert f"clip: warning: {folder / name}: DecompressionBombWarning: Image size (1920 pixels)" in err
    assert (f"clip: warning: skipping {folder / 'junk.png'}: cannot read it as an image (UnidentifiedImageError: "
            f"cannot identify image file {str(folder / 'junk.png')!r})") in err
    assert "BufferedReader" not in err


# ----------------------------------------------------------------------------------------------------------------
# Decoding: the worker split, --fast-decode, --auto-orient (issue 28; the decoding itself: tests/test_decode.py)

MICRO = REPO / "tests" / "data" / "micro"


def _photo_folder(root: pathlib.Path) -> pathlib.Path:
    """Photo-like JPEGs big enough for a reduced decode at a 32-px input (baseline, progressive, CMYK, greyscale),
    and a PNG, a GIF and a WebP as large, which are decoded in full either way."""
    from test_decode import jpeg_bytes, photo

    root.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([(300, 260), (600, 520), (260, 300), (400, 300)]):
        (root / f"p{i}.jpg").write_bytes(jpeg_bytes(photo(size, seed=i)))
    (root / "progressive.jpg").write_bytes(jpeg_bytes(photo((320, 280), seed=5), progressive=True))
    (root / "cmyk.jpg").write_bytes(jpeg_bytes(photo((300, 300), seed=6).convert("CMYK")))
    (root / "grey.jpeg").write_bytes(jpeg_bytes(photo((280, 300), seed=7).convert("L")))
    (root / "small.jpg").write_bytes(jpeg_bytes(photo((100, 90), seed=8)))
    photo((300, 260), seed=9).save(root / "big.png")
    photo((300, 260), seed=10).save(root / "big.gif")
    photo((300, 260), seed=11).save(root / "big.webp", quality=90)
    return root


NOT_REDUCED = {"small.jpg", "big.png", "big.gif", "big.webp"}


def _by_batches(model, preprocess, paths, batch_size, threads):
    """clip.load + preprocess + encode_image, normalised, batch by batch as the command cuts them; the i-th batch
    under ``threads(i)`` torch threads."""
    saved = torch.get_num_threads()
    rows = []
    try:
        for number, start in enumerate(range(0, len(paths), batch_size)):
            torch.set_num_threads(threads(number))
            with torch.inference_mode():
                batch = torch.stack([preprocess(Image.open(p)) for p in paths[start:start + batch_size]])
                rows.append(torch.nn.functional.normalize(model.encode_image(batch).float(), dim=-1))
    finally:
        torch.set_num_threads(saved)
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("micro", ["micro-vit.pt", "micro-rn.pt"])
@pytest.mark.parametrize("split", [(1, 1), (2, 1), (1, 2), (3, 1)])
def test_embed_is_the_model_bit_for_bit_whatever_the_worker_split(capsys, tmp_path, monkeypatch, micro, split):
    """The split (forced here) changes the workers and the model's threads after the probe batches, never a bit
    of a row: every row equals clip.load + encode_image run on the same batch with the same threads."""
    from clip import _embed

    folder = _photo_folder(tmp_path / "photos")
    monkeypatch.setattr(_embed, "split_cores", lambda decode, model, cores: split)
    threads = torch.get_num_threads()
    code, _, err = run(capsys, "embed", folder, "-o", tmp_path / "f.npy", "-m", MICRO / micro, "--device", "cpu",
                       "--batch-size", "2")
    assert code == 0, err
    rows = (tmp_path / "f.txt").read_text().splitlines()
    assert rows == sorted(os.listdir(folder))
    model, preprocess = clip.load(str(MICRO / micro), device="cpu")
    chosen = _embed.PROBE_BATCHES - 1  # the split is chosen with this batch in hand, and applies to it
    expected = _by_batches(model, preprocess, [folder / r for r in rows], 2,
                           lambda number: threads if number < chosen else min(split[1], threads))
    assert np.array_equal(np.load(tmp_path / "f.npy"), expected)
    assert torch.get_num_threads() == threads


def test_the_users_num_workers_wins_over_the_measured_split(capsys, checkpoint, reference, tmp_path, monkeypatch):
    from clip import _embed

    def fail(*args):
        raise AssertionError("the split was measured although --num-workers was given")

    monkeypatch.setattr(_embed, "split_cores", fail)
    folder = _photo_folder(tmp_path / "photos")
    for workers in ("0", "2"):
        code, _, err = _embed_with(capsys, checkpoint, folder, tmp_path / f"w{workers}.npy", "--num-workers", workers)
        assert code == 0, err


def _embed_with(capsys, checkpoint, folder, output, *extra):
    return run(capsys, "embed", folder, "-o", output, "-m", checkpoint, "--device", "cpu", "--batch-size", "3",
               *extra)


@pytest.mark.parametrize("micro", ["micro-vit.pt", "micro-rn.pt"])
def test_fast_decode_rows_are_close_to_the_exact_ones_in_the_same_order(capsys, tmp_path, micro):
    folder = _photo_folder(tmp_path / "photos")
    # One fixed split for both runs: a measured one may give them different thread counts, and so last bits.
    for name, flags in (("exact", []), ("fast", ["--fast-decode"])):
        code, _, err = _embed_with(capsys, MICRO / micro, folder, tmp_path / f"{name}.npy", "--num-workers", "1",
                                   *flags)
        assert code == 0, err
    rows = (tmp_path / "exact.txt").read_text().splitlines()
    assert (tmp_path / "fast.txt").read_text().splitlines() == rows == sorted(os.listdir(folder))
    exact, fast = np.load(tmp_path / "exact.npy"), np.load(tmp_path / "fast.npy")
    cosines = np.sum(exact * fast, axis=1)
    assert cosines.min() > 0.999, dict(zip(rows, cosines))
    for row, name in enumerate(rows):
        # Not reduced: the same pixels; reduced: other pixels (the reduction did happen).
        assert np.array_equal(exact[row], fast[row]) == (name in NOT_REDUCED), name


def test_fast_decode_rows_are_preprocess_of_open_image(capsys, checkpoint, reference, tmp_path):
    """The command's --fast-decode is the documented function: preprocess(clip.clip.open_image(path, n_px))."""
    folder = _photo_folder(tmp_path / "photos")
    code, _, err = _embed_with(capsys, checkpoint, folder, tmp_path / "f.npy", "--fast-decode", "--num-workers", "0")
    assert code == 0, err
    model, preprocess = reference
    rows = (tmp_path / "f.txt").read_text().splitlines()
    with torch.no_grad():
        features = model.encode_image(torch.stack([
            preprocess(clip.clip.open_image(folder / r, model.visual.input_resolution)) for r in rows]))
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), torch.nn.functional.normalize(features).numpy(),
                               atol=1e-5)


def test_auto_orient_embeds_a_sideways_photo_as_its_upright_picture(capsys, checkpoint, tmp_path):
    from test_decode import photo, rotated_with_exif

    upright = photo((60, 40))
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.save(folder / "upright.png")
    rotated_with_exif(upright, folder / "sideways.png")
    for name, flags in (("stored", []), ("oriented", ["--auto-orient"]), ("fast", ["--auto-orient", "--fast-decode"])):
        code, _, err = _embed_with(capsys, checkpoint, folder, tmp_path / f"{name}.npy", *flags)
        assert code == 0, err
        assert (tmp_path / f"{name}.txt").read_text().splitlines() == ["sideways.png", "upright.png"]
    oriented = np.load(tmp_path / "oriented.npy")
    assert np.array_equal(oriented[0], oriented[1])
    assert np.array_equal(np.load(tmp_path / "fast.npy"), oriented)  # PNG: nothing to reduce
    stored = np.load(tmp_path / "stored.npy")
    assert np.array_equal(stored[1], oriented[1]) and not np.allclose(stored[0], stored[1], atol=1e-3)


def test_classify_takes_fast_decode_and_auto_orient(capsys, checkpoint, tmp_path):
    from test_decode import photo, rotated_with_exif

    upright = photo((60, 40))
    upright.save(tmp_path / "upright.png")
    rotated_with_exif(upright, tmp_path / "sideways.png")
    labels = ["a dog", "a cat", "a bird"]
    code, out, err = run(capsys, "classify", tmp_path / "upright.png", tmp_path / "sideways.png", "--labels", *labels,
                         "-m", checkpoint, "--device", "cpu", "--json", "--auto-orient", "--fast-decode")
    assert code == 0, err
    first, second = json.loads(out)
    assert first["labels"] == second["labels"]


def test_classify_of_many_images_decodes_in_workers_with_the_same_results(capsys, checkpoint, tmp_path, monkeypatch):
    from clip import _embed

    folder = _photo_folder(tmp_path / "photos")
    labels = ["a dog", "a cat", "a bird"]
    seen = []
    batches = _embed.image_batches
    monkeypatch.setattr(_embed, "image_batches", lambda *a, **k: seen.append(k) or batches(*a, **k))
    results = {}
    for size in ("2", "32"):  # 11 images: six batches, balanced, in workers; one batch, in this process
        code, out, err = run(capsys, "classify", folder, "--labels", *labels, "-m", checkpoint, "--device", "cpu",
                             "--json", "--batch-size", size)
        assert code == 0, err
        results[size] = json.loads(out)
    assert [(k["num_workers"], k["balance"]) for k in seen] == [(1, True), (0, False)]
    assert [r["image"] for r in results["2"]] == [r["image"] for r in results["32"]]
    for many, one in zip(results["2"], results["32"]):
        assert [e["label"] for e in many["labels"]] == [e["label"] for e in one["labels"]]
        assert [e["probability"] for e in many["labels"]] == pytest.approx([e["probability"] for e in one["labels"]],
                                                                            abs=1e-5)
