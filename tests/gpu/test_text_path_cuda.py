"""CUDA checks of encode_text's trimming, for a machine with a GPU (skipped elsewhere): device syncs per call,
CUDA-graph capture, and features in float16 against float32 on the CPU.

Run them with ``python -m pytest tests/gpu -q`` where ``torch.cuda.is_available()``.
"""
import pytest
import torch

from checkpoints import TINY_VIT, random_state_dict
from cuda_syncs import device_syncs
from clip.model import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MIXED = [3, 5, 40, 75, 0, 12]  # numbers of ids: 75 fills all 77 positions


def tokens(lengths):
    text = torch.zeros(len(lengths), 77, dtype=torch.long)
    for row, n in enumerate(lengths):
        text[row, 0], text[row, 1:n + 1], text[row, n + 1] = 49406, torch.arange(400, 400 + n), 49407
    return text


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(TINY_VIT)


@pytest.fixture
def model(state_dict):
    return build_model(state_dict).cuda()  # the release dtypes: float16 activations, a float32 CPU attn_mask


@pytest.mark.parametrize("lengths", [[3, 5, 9], MIXED], ids=["one group", "groups"])
def test_a_trimmed_call_syncs_once(model, lengths):
    """One host read of the end-of-text positions per call; no mask copy per block."""
    text = tokens(lengths).cuda()
    with torch.no_grad():
        model.encode_text(text)  # the first call makes the causal mask on this device
        assert device_syncs(lambda: model.encode_text(text)) == 1


def test_the_full_length_never_syncs(model):
    model.trim_text = False
    text = tokens(MIXED).cuda()
    x = torch.randn(77, 2, model.ln_final.weight.shape[0], device="cuda", dtype=model.dtype)  # (L, N, D)
    with torch.no_grad():
        model.encode_text(text)
        assert device_syncs(lambda: model.encode_text(text)) == 0
        assert device_syncs(lambda: model.transformer(x)) == 0


def test_encode_text_can_be_captured_in_a_cuda_graph(model):
    text = tokens(MIXED).cuda()
    with torch.no_grad():
        want = model.encode_text(text)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
            model.encode_text(text)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # capture cannot read lengths: the full length runs
            captured = model.encode_text(text)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, want, rtol=1e-2, atol=1e-2)


def test_grouped_float16_features_agree_with_float32_on_the_cpu(state_dict, model):
    reference = build_model(state_dict).float()
    text = tokens(MIXED)
    with torch.no_grad():
        want = reference.encode_text(text)
        got = model.encode_text(text.cuda()).float().cpu()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
