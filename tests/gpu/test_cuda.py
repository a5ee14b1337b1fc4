"""CUDA checks, for a machine with a GPU (skipped elsewhere): float16 on the GPU agrees with float32 on the CPU.

Run them with ``python -m pytest tests/gpu -q`` where ``torch.cuda.is_available()``.
"""
import pytest
import torch

import clip
from compare import relative_error
from checkpoints import TINY_RN, TINY_VIT, random_state_dict, save_archive

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def inputs(size: int):
    torch.manual_seed(0)
    image = torch.randn(4, 3, size, size)
    text = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate([3, 8, 20]):
        text[row, 0], text[row, 1:n + 1], text[row, n + 1] = 49406, torch.arange(400, 400 + n), 49407
    return image, text


@pytest.mark.parametrize("dims", [TINY_VIT, TINY_RN], ids=["vit", "rn"])
@pytest.mark.parametrize("jit", [False, True])
def test_float16_on_cuda_agrees_with_float32_on_cpu(tmp_path, dims, jit):
    path = save_archive(tmp_path / "model.pt", random_state_dict(dims))
    reference, _ = clip.load(path, device="cpu")
    model, _ = clip.load(path, device="cuda", jit=jit)
    image, text = inputs(dims.image_resolution)
    with torch.no_grad():
        want_image, want_text = reference.encode_image(image), reference.encode_text(text)
        got_image = model.encode_image(image.cuda())
        got_text = model.encode_text(text.cuda())
    assert relative_error(got_image, want_image) < 1e-2
    assert relative_error(got_text, want_text) < 1e-2


def test_release_dtypes_on_cuda(tmp_path):
    path = save_archive(tmp_path / "model.pt", random_state_dict(TINY_VIT))
    model, _ = clip.load(path, device="cuda")
    assert model.dtype == torch.float16
    assert model.visual.conv1.weight.dtype == torch.float16
    assert model.ln_final.weight.dtype == torch.float32
    assert model.logit_scale.dtype == torch.float32


def test_weights_land_on_the_requested_device(tmp_path):
    index = torch.cuda.device_count() - 1
    path = save_archive(tmp_path / "model.pt", random_state_dict(TINY_VIT))
    model, _ = clip.load(path, device=f"cuda:{index}")
    assert {p.device for p in model.parameters()} == {torch.device("cuda", index)}
    jit_model, _ = clip.load(path, device=f"cuda:{index}", jit=True)
    assert {p.device for p in jit_model.parameters()} == {torch.device("cuda", index)}


def test_build_model_returns_a_cpu_model_from_cuda_tensors():
    """As the original's build_model: the model is on the CPU whatever device the state dict's tensors are on."""
    from clip.model import build_model

    state_dict = {k: v.cuda() for k, v in random_state_dict(TINY_VIT).items()}
    model = build_model(state_dict)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
