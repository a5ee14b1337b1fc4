"""``--precision bf16`` of ``clip embed`` and ``clip classify``: bfloat16 autocast on CPUs that compute it natively,
float32 (exactly ``clip.load`` + ``encode_image``) everywhere else and by default.

Whether the CPU computes bfloat16 natively is read from ``/proc/cpuinfo``; the tests point the package at a file of
their own (``_embed.CPUINFO``) to play either kind of CPU on any machine.
"""
import json
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

import clip
from clip import _embed
from clip._cli import main
from checkpoints import TINY_VIT, random_state_dict, save_state_dict

MICRO = pathlib.Path(__file__).resolve().parent / "data" / "micro"
MICRO_MODELS = [MICRO / "micro-vit.pt", MICRO / "micro-rn.pt"]
# The /proc/cpuinfo flags lines of two x86 CPUs: an AVX2 one (no bfloat16) and a Sapphire Rapids one (AMX).
AVX2_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"
AMX_FLAGS = AVX2_FLAGS + " avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile amx_int8"
# The bound for bfloat16 rows against float32 rows.
MIN_COSINE = 0.999


def _cpuinfo(tmp_path, flags: str, key: str = "flags") -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\n{key}\t\t: {flags}\n\nprocessor\t: 1\n")
    return str(path)


@pytest.fixture
def native_bf16(tmp_path, monkeypatch):
    """The package sees a CPU with AMX and AVX512-BF16."""
    monkeypatch.setattr(_embed, "CPUINFO", _cpuinfo(tmp_path, AMX_FLAGS))


@pytest.fixture
def no_native_bf16(tmp_path, monkeypatch):
    """The package sees an AVX2 CPU, without bfloat16 instructions."""
    monkeypatch.setattr(_embed, "CPUINFO", _cpuinfo(tmp_path, AVX2_FLAGS))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
    """Seven noise images of several sizes, in nested folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(48, 40), (32, 32), (90, 30), (40, 64), (33, 47), (64, 64), (50, 50)]):
        path = root / ("sub" if i % 3 else "") / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny ViT with the release vocabulary, for texts (the micro models have a vocabulary of 512)."""
    return save_state_dict(tmp_path_factory.mktemp("model") / "tiny.pt", random_state_dict(TINY_VIT))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _run_embed(capsys, model, source, output, *extra):
    code, _, err = run(capsys, "embed", source, "-o", output, "-m", model, "--device", "cpu", "--batch-size", "3",
                       "--num-workers", "0", "-q", *extra)
    assert code == 0, err
    summary = err.splitlines()[-1]
    assert summary.endswith(f"embedded into {output} (rows listed in {output.with_suffix('.txt')})"), err
    return np.load(output), output.with_suffix(".txt").read_text().splitlines(), err[:-len(summary) - 1]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------------------------------------------
# Which CPUs run bfloat16


def test_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    assert _embed.cpu_flags(_cpuinfo(tmp_path, AMX_FLAGS)) == frozenset(AMX_FLAGS.split())
    arm = _embed.cpu_flags(_cpuinfo(tmp_path, "fp asimd evtstrm aes sve bf16 i8mm", key="Features"))
    assert arm == frozenset({"fp", "asimd", "evtstrm", "aes", "sve", "bf16", "i8mm"})
    assert _embed.cpu_flags(str(tmp_path / "missing")) is None
    (tmp_path / "empty").write_text("")
    assert _embed.cpu_flags(str(tmp_path / "empty")) is None
    # RISC-V, POWER and s390x list no flags line: read, and no native bfloat16 flag known (not "not readable").
    (tmp_path / "riscv").write_text("processor\t: 0\nhart\t\t: 0\nisa\t\t: rv64imafdc\n")
    assert _embed.cpu_flags(str(tmp_path / "riscv")) == frozenset()
    use, message = _embed.bf16_decision("cpu", frozenset(), force=False)
    assert not use and "no native bfloat16 flags are known for this CPU" in message and "not readable" not in message


@pytest.mark.parametrize("flags, native", [
    (AVX2_FLAGS, False),
    (AVX2_FLAGS + " avx512f avx512bw avx512vl", False),  # AVX-512 without its BF16 extension
    (AVX2_FLAGS + " avx512_bf16", True),  # Cooper Lake, Zen 4
    (AVX2_FLAGS + " amx_bf16 amx_tile", True),  # Sapphire Rapids
    ("fp asimd sve bf16", True),  # Arm with the BF16 extension (Graviton 3, Neoverse V1)
])
def test_bf16_runs_only_where_the_cpu_has_it(flags, native):
    use, message = _embed.bf16_decision("cpu", frozenset(flags.split()), force=False)
    assert use is native
    if native:
        assert message is None
    else:
        assert message == ("--precision bf16: this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 "
                           "flag), so it would be slower; running float32 (--force-precision runs bfloat16 anyway)")
    assert _embed.bf16_decision("cpu", frozenset(flags.split()), force=True) == (True, None)


def test_bf16_on_an_unknown_cpu_runs_float32_unless_forced():
    use, message = _embed.bf16_decision("cpu", None, force=False)
    assert not use and message.startswith("--precision bf16: cannot tell whether this CPU computes bfloat16")
    assert "running float32 (--force-precision runs bfloat16 anyway)" in message
    assert _embed.bf16_decision("cpu", None, force=True) == (True, None)


@pytest.mark.parametrize("force", [False, True])
def test_bf16_on_cuda_keeps_the_release_float16(force):
    use, message = _embed.bf16_decision("cuda", frozenset(AMX_FLAGS.split()), force=force)
    assert not use
    assert message == ("--precision bf16 applies to the CPU; on cuda the model runs in the release's float16 "
                       "weights, as clip.load gives them: running that")


def test_this_machine_is_read(capsys):
    """Whatever this CPU is, the real /proc/cpuinfo is read where Linux has one."""
    flags = _embed.cpu_flags()
    if pathlib.Path("/proc/cpuinfo").is_file():
        assert flags is not None and len(flags) > 0
    else:
        assert flags is None


# ----------------------------------------------------------------------------------------------------------------
# clip embed


@pytest.mark.parametrize("model", MICRO_MODELS, ids=lambda p: p.stem)
def test_fp32_is_exactly_clip_load_and_encode_image(capsys, images, tmp_path, model):
    features, rows, err = _run_embed(capsys, model, images, tmp_path / "fp32.npy", "--precision", "fp32")
    assert err == ""
    reference, preprocess = clip.load(str(model), device="cpu")
    with torch.no_grad():
        expected = []
        for start in range(0, len(rows), 3):  # the command's batches
            batch = torch.stack([preprocess(Image.open(images / row)) for row in rows[start:start + 3]])
            expected.append(torch.nn.functional.normalize(reference.encode_image(batch).float(), dim=-1))
    np.testing.assert_array_equal(features, torch.cat(expected).numpy())
    default, default_rows, _ = _run_embed(capsys, model, images, tmp_path / "default.npy")
    np.testing.assert_array_equal(default, features)
    assert default_rows == rows


@pytest.mark.parametrize("model", MICRO_MODELS, ids=lambda p: p.stem)
def test_bf16_rows_are_within_the_bound_of_float32(capsys, images, tmp_path, native_bf16, model):
    fp32, fp32_rows, _ = _run_embed(capsys, model, images, tmp_path / "fp32.npy")
    bf16, bf16_rows, err = _run_embed(capsys, model, images, tmp_path / "bf16.npy", "--precision", "bf16")
    assert err == ""  # a CPU with bfloat16: nothing to say
    assert bf16_rows == fp32_rows and len(bf16_rows) == 7
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-5)
    cosines = _cosines(bf16, fp32)
    assert cosines.min() > MIN_COSINE, cosines
    assert not np.array_equal(bf16, fp32)  # bfloat16 really ran
    assert np.abs(bf16 - fp32).max() > 1e-4


def test_bf16_is_what_autocast_gives(capsys, images, tmp_path, native_bf16):
    """The command's bf16 rows are clip.load + encode_image under torch.autocast, as the README shows."""
    model = MICRO_MODELS[0]
    features, rows, _ = _run_embed(capsys, model, images, tmp_path / "bf16.npy", "--precision", "bf16")
    reference, preprocess = clip.load(str(model), device="cpu")
    expected = []
    with torch.no_grad():
        for start in range(0, len(rows), 3):
            batch = torch.stack([preprocess(Image.open(images / row)) for row in rows[start:start + 3]])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                encoded = reference.encode_image(batch)
            assert encoded.dtype == torch.bfloat16
            expected.append(torch.nn.functional.normalize(encoded.float(), dim=-1))
    np.testing.assert_array_equal(features, torch.cat(expected).numpy())


@pytest.mark.parametrize("model", MICRO_MODELS, ids=lambda p: p.stem)
def test_without_native_bf16_it_warns_once_and_runs_float32(capsys, images, tmp_path, no_native_bf16, model):
    fp32, fp32_rows, _ = _run_embed(capsys, model, images, tmp_path / "fp32.npy")
    asked, rows, err = _run_embed(capsys, model, images, tmp_path / "bf16.npy", "--precision", "bf16")
    assert err == ("clip: warning: --precision bf16: this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or "
                   "bf16 flag), so it would be slower; running float32 (--force-precision runs bfloat16 anyway)\n")
    np.testing.assert_array_equal(asked, fp32)
    assert rows == fp32_rows


def test_force_precision_runs_bf16_on_any_cpu(capsys, images, tmp_path, no_native_bf16):
    model = MICRO_MODELS[0]
    fp32, _, _ = _run_embed(capsys, model, images, tmp_path / "fp32.npy")
    forced, _, err = _run_embed(capsys, model, images, tmp_path / "bf16.npy", "--precision", "bf16",
                            "--force-precision")
    assert err == ""
    assert not np.array_equal(forced, fp32) and _cosines(forced, fp32).min() > MIN_COSINE
    # Without --precision bf16, --force-precision would change nothing: a usage error, before any work.
    code, _, err = run(capsys, "embed", images, "-o", tmp_path / "same.npy", "-m", model, "--force-precision")
    assert code == 2 and err == ("clip: error: --force-precision applies to --precision bf16 only; add --precision "
                                 "bf16, or drop it (see 'clip embed --help')\n")
    assert not (tmp_path / "same.npy").exists()


def test_bf16_texts(capsys, tiny_checkpoint, tmp_path, native_bf16):
    texts = tmp_path / "captions.txt"
    texts.write_text("a photo of a dog\na cat\n\n" + "word " * 100 + "\na diagram of a model\n")
    fp32, fp32_rows, _ = _run_embed(capsys, tiny_checkpoint, texts, tmp_path / "fp32.npy")
    bf16, bf16_rows, err = _run_embed(capsys, tiny_checkpoint, texts, tmp_path / "bf16.npy", "--precision", "bf16")
    assert err == "" and bf16_rows == fp32_rows and len(bf16_rows) == 4
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32) and _cosines(bf16, fp32).min() > MIN_COSINE


# ----------------------------------------------------------------------------------------------------------------
# clip classify


def _classify(capsys, model, images, *extra):
    code, out, err = run(capsys, "classify", images, "--labels", "a dog", "a cat", "noise", "a diagram",
                         "--template", "a photo of {}.", "-m", model, "--device", "cpu", "--json", "--top-k", "4",
                         *extra)
    assert code == 0, err
    return [{e["label"]: e["probability"] for e in r["labels"]} for r in json.loads(out)], err


def test_classify_bf16_is_close_to_float32(capsys, tiny_checkpoint, images, native_bf16):
    fp32, _ = _classify(capsys, tiny_checkpoint, images)
    bf16, err = _classify(capsys, tiny_checkpoint, images, "--precision", "bf16")
    assert err == "" and len(bf16) == len(fp32) == 7
    for got, expected in zip(bf16, fp32):
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, abs=0.02)
    assert bf16 != fp32  # bfloat16 really ran


def test_classify_without_native_bf16_warns_and_runs_float32(capsys, tiny_checkpoint, images, no_native_bf16):
    fp32, _ = _classify(capsys, tiny_checkpoint, images)
    asked, err = _classify(capsys, tiny_checkpoint, images, "--precision", "bf16")
    assert err.startswith("clip: warning: --precision bf16: this CPU has no native bfloat16") and err.count("\n") == 1
    assert asked == fp32


def test_precision_is_a_choice(capsys, images, tmp_path):
    code, _, err = run(capsys, "embed", images, "-o", tmp_path / "x.npy", "--precision", "fp16")
    assert code == 2 and "invalid choice: 'fp16'" in err


def test_the_readmes_autocast_example(tiny_checkpoint, images):
    """The README's Python example, run on the tiny model: float32 rows within the bound of float32's."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "torch.autocast" in b]
    photo = sorted(images.glob("*.png"))[0]
    code = block.replace('"ViT-B/32"', repr(tiny_checkpoint)).replace('"photo.jpg"', repr(str(photo)))
    scope = {"clip": clip, "torch": torch, "Image": Image}
    exec(compile(code, "README.md", "exec"), scope)
    model, preprocess = clip.load(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(photo)).unsqueeze(0))
        text = model.encode_text(clip.tokenize(["a diagram", "a dog", "a cat"]))
    for got, expected in ((scope["image_features"], image), (scope["text_features"], text)):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        cosines = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
        assert cosines.min() > MIN_COSINE and not torch.equal(got, expected)
