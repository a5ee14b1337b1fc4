"""Preprocessing equals the original's tensors bit for bit, on every Pillow mode of the golden images."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import Normalize

from clip.clip import BICUBIC, _convert_image_to_rgb, _transform


@pytest.fixture(scope="module")
def expected(golden_dir):
    return load_file(str(golden_dir / "preprocess-outputs.safetensors"))


def test_every_golden_image_and_size_is_covered(expected):
    images = {key.rsplit(".", 1)[0] for key in expected}
    assert {"rgb_640x480", "rgba_37x53", "p_64x64", "l_300x200", "la_20x90"} <= images
    assert {key.rsplit(".", 1)[1] for key in expected} == {"224", "288"}


def test_preprocess_is_bit_exact(golden_dir, expected):
    for key, want in expected.items():
        image, n_px = key.rsplit(".", 1)
        with Image.open(golden_dir / f"pre_{image}.png") as img:
            got = _transform(int(n_px))(img)
        assert got.dtype == torch.float32 and got.shape == (3, int(n_px), int(n_px)), key
        assert torch.equal(got, want), key


def test_transform_shape_of_the_original():
    preprocess = _transform(224)
    assert isinstance(preprocess.transforms[-1], Normalize)
    assert preprocess.transforms[0].interpolation == BICUBIC
    assert preprocess.transforms[2] is _convert_image_to_rgb
    assert _convert_image_to_rgb(Image.new("P", (4, 4))).mode == "RGB"
