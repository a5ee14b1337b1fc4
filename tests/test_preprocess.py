"""Preprocessing equals the original's tensors bit for bit, on every Pillow mode and on a large drawn image.

``data/preprocess.json`` holds the SHA-256 of each tensor the original package's ``_transform`` made from the same
inputs (see ``data/README.md``), so any change of a single bit fails.
"""
import json

import pytest
from PIL import Image
from torchvision.transforms import Normalize

from clip.clip import BICUBIC, _convert_image_to_rgb, _transform
from preprocess_cases import DATA, SIZES, fingerprint, images


@pytest.fixture(scope="module")
def expected():
    return json.loads((DATA / "preprocess.json").read_text())


def test_every_case_and_size_is_covered(expected):
    cases = images()
    assert {f"{name}.{n_px}" for name in cases for n_px in SIZES} == set(expected)
    assert {image.mode for image in cases.values()} == {"RGB", "RGBA", "P", "L", "LA"}


def test_preprocess_is_bit_exact(expected):
    for name, image in images().items():
        for n_px in SIZES:
            assert fingerprint(_transform(n_px)(image)) == expected[f"{name}.{n_px}"], (name, n_px)


def test_a_one_bit_change_is_seen(expected):
    image = images()["drawn_rgb_640x480"]
    image.putpixel((320, 240), tuple(v ^ 1 for v in image.getpixel((320, 240))))
    assert fingerprint(_transform(224)(image)) != expected["drawn_rgb_640x480.224"]


def test_transform_shape_of_the_original():
    preprocess = _transform(224)
    assert isinstance(preprocess.transforms[-1], Normalize)
    assert preprocess.transforms[0].interpolation == BICUBIC
    assert preprocess.transforms[2] is _convert_image_to_rgb
    assert _convert_image_to_rgb(Image.new("P", (4, 4))).mode == "RGB"
