"""Decoding an image file for the model's preprocessing: ``open_image``. By default exactly what ``Image.open``
gives the original's ``preprocess``; on request a JPEG decoded at a reduced size (Pillow's DCT-domain ``draft``)
and the EXIF orientation applied. No torch.
"""
import os
from typing import BinaryIO, Optional, Union

from PIL import Image, ImageOps

# A reduced decode keeps both sides at least this many times the model's input, so the bicubic resize that follows
# still averages several decoded pixels into each input pixel (README, "embed": what it costs).
DRAFT_MARGIN = 2
# The formats Pillow decodes through libjpeg, whose draft mode scales by 1/2, 1/4 or 1/8 while decoding (MPO: the
# multi-picture JPEGs many phones write).
DRAFT_FORMATS = ("JPEG", "MPO")


def open_image(file: Union[str, "os.PathLike[str]", BinaryIO], n_px: Optional[int] = None, *,
               auto_orient: bool = False) -> Image.Image:
    """Decode an image for ``preprocess``: ``preprocess(open_image(path, 224))`` is what ``clip embed
    --fast-decode`` computes.

    Parameters
    ----------
    file : str, os.PathLike or binary file
        The image: a path, or a file opened in binary mode (left open).
    n_px : int, optional
        The model's input resolution (``model.visual.input_resolution``). Given, a JPEG is decoded at the smallest
        size Pillow's ``draft`` offers (1/2, 1/4 or 1/8) that keeps both sides at least ``2 * n_px``; other formats,
        and JPEGs too small to reduce, are decoded in full. None (the default): decoded in full, the original's
        pixels exactly.
    auto_orient : bool
        Turn the picture as its EXIF orientation says (``PIL.ImageOps.exif_transpose``), as a photo viewer shows
        it. The original embeds the stored pixels: a portrait phone photo stored sideways stays sideways.

    Returns
    -------
    PIL.Image.Image
        The decoded image, loaded (it no longer needs the file), in its stored mode: ``preprocess`` converts it
        to RGB after cropping, as for any image.
    """
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as opened:
            return open_image(opened, n_px, auto_orient=auto_orient)
    image = Image.open(file)
    if n_px is not None and image.format in DRAFT_FORMATS and min(image.size) >= 2 * DRAFT_MARGIN * n_px:
        # Pillow picks the largest reduction whose result is at least the requested size in both directions.
        image.draft(image.mode, (DRAFT_MARGIN * n_px, DRAFT_MARGIN * n_px))
    image.load()
    return ImageOps.exif_transpose(image) if auto_orient else image
