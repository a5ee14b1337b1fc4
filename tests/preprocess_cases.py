"""The preprocessing cases: the stored Pillow-mode images, and a large image the tests draw themselves.

Shared by ``test_preprocess.py`` and ``data/make_preprocess_expected.py``, which computed the expected hashes with
the original package, so both see exactly the same inputs.
"""
import hashlib
import pathlib
from typing import Dict

import numpy as np
import torch
from PIL import Image

DATA = pathlib.Path(__file__).resolve().parent / "data"
SIZES = (224, 288)  # the release resolutions that differ in how far a 640x480 image is scaled down


def drawn_image() -> Image.Image:
    """A 640x480 RGB image with gradients, edges and fine texture, from integer arithmetic alone.

    Integer formulas (not a random generator, whose streams may change between numpy releases) make it the same
    everywhere; the mix of smooth and sharp content exercises the bicubic filter's antialiasing when scaling down.
    """
    y, x = np.mgrid[0:480, 0:640].astype(np.int64)  # [480, 640] each
    red = (x * 255) // 639
    green = ((x // 40 + y // 40) % 2) * 200 + (y * 55) // 479
    blue = (x * x + 3 * y * y + 7 * x * y) % 256
    pixels = np.stack([red, green, blue], axis=-1).astype(np.uint8)  # [480, 640, 3]
    return Image.fromarray(pixels, "RGB")


def images() -> Dict[str, Image.Image]:
    """Every case by name: the drawn image and the stored images of other Pillow modes (L, LA, P, RGB, RGBA)."""
    cases = {"drawn_rgb_640x480": drawn_image()}
    for path in sorted((DATA / "images").glob("*.png")):
        with Image.open(path) as image:
            image.load()
            cases[path.stem] = image
    return cases


def fingerprint(tensor: torch.Tensor) -> dict:
    """Shape, dtype and the SHA-256 of a tensor's bytes: enough to check bit-exactness without storing it."""
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
            "sha256": hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()}
