"""Decoding for the model: ``clip.clip.open_image`` (reduced JPEG decoding, EXIF orientation) and the split of the
CPU cores between decoding workers and the model (``clip._embed.split_cores``, ``image_batches(balance=True)``).

Images are small: at the micro models' 32-px input, a JPEG of 256 px and more is already reduced.
"""
import io
import os
import pathlib
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clip import _embed
from clip.clip import _transform, open_image

N_PX = 32  # the micro models' input resolution


def photo(size, seed=0) -> Image.Image:
    """A photo-like RGB picture: a smooth gradient, a few shapes, mild noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    picture = Image.fromarray(rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(picture, dtype=np.float32)
    pixels[height // 4:height // 2, width // 5:width // 2] = (200, 40, 90)  # a rectangle
    pixels += rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(picture: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def full(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


# ----------------------------------------------------------------------------------------------------------------
# Reduced decoding of JPEGs


# The smallest of 1/1, 1/2, 1/4, 1/8 that keeps both sides at least 2 x 32 = 64, worked out by hand.
@pytest.mark.parametrize("size, decoded", [
    ((600, 520), (75, 65)),  # 1/8: 520 / 8 = 65
    ((300, 260), (75, 65)),  # 1/4: 260 / 8 would be 32.5
    ((300, 255), (150, 128)),  # 1/2: 255 / 4 would be 63.75
    ((128, 128), (64, 64)),  # 1/2, exactly 64
    ((127, 400), (127, 400)),  # too small to halve: decoded in full
])
def test_a_jpeg_is_decoded_at_the_smallest_scale_keeping_twice_the_input(size, decoded):
    data = jpeg_bytes(photo(size))
    assert open_image(io.BytesIO(data), N_PX).size == decoded
    assert open_image(io.BytesIO(data)).size == size  # no n_px: the full picture


def test_the_reduced_decode_is_libjpegs_scaled_decode_and_the_same_picture():
    """Against a 1/4 decode asked of Pillow by hand, and against the full decode averaged over 4 x 4 blocks."""
    data = jpeg_bytes(photo((300, 260)))
    ours = open_image(io.BytesIO(data), N_PX)
    by_hand = Image.open(io.BytesIO(data))
    by_hand.draft("RGB", (300 // 4, 260 // 4))
    assert np.array_equal(np.asarray(ours), np.asarray(by_hand))
    preprocess = _transform(N_PX)
    assert torch.equal(preprocess(ours), preprocess(by_hand))
    averaged = np.asarray(full(data).reduce(4), dtype=np.float32)  # [65, 75, 3]
    assert np.abs(np.asarray(ours, dtype=np.float32) - averaged).mean() < 2  # grey levels of 255


def test_a_small_jpeg_and_other_formats_are_decoded_exactly(tmp_path):
    picture = photo((600, 520))
    small = jpeg_bytes(photo((100, 90)))
    assert np.array_equal(np.asarray(open_image(io.BytesIO(small), N_PX)), np.asarray(full(small)))
    for suffix, options in ((".png", {}), (".gif", {}), (".webp", {"quality": 90}), (".bmp", {})):
        path = tmp_path / f"big{suffix}"
        picture.save(path, **options)
        with Image.open(path) as reference:
            assert open_image(path, N_PX).size == (600, 520)
            assert np.array_equal(np.asarray(open_image(path, N_PX)), np.asarray(reference)), suffix
            assert open_image(path, N_PX).mode == reference.mode  # GIF stays a palette image, as preprocess sees it


@pytest.mark.parametrize("kind", ["cmyk", "progressive", "greyscale"])
def test_cmyk_progressive_and_greyscale_jpegs_are_reduced_in_their_own_mode(kind):
    picture = photo((600, 520))
    data = (jpeg_bytes(picture.convert("CMYK")) if kind == "cmyk" else
            jpeg_bytes(picture, progressive=True) if kind == "progressive" else jpeg_bytes(picture.convert("L")))
    ours = open_image(io.BytesIO(data), N_PX)
    reference = full(data)
    assert ours.size == (75, 65) and ours.mode == reference.mode
    averaged = np.asarray(reference.reduce(8), dtype=np.float32)
    assert np.abs(np.asarray(ours, dtype=np.float32) - averaged).mean() < 3
    tensor = _transform(N_PX)(ours)
    assert tensor.shape == (3, N_PX, N_PX)
    exact = _transform(N_PX)(reference)
    assert torch.nn.functional.cosine_similarity(tensor.flatten(), exact.flatten(), dim=0) > 0.99


def test_open_image_reads_a_path_or_leaves_an_open_file_open(tmp_path):
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(photo((300, 260))))
    with open(path, "rb") as file:
        from_file = open_image(file, N_PX)
        assert not file.closed
    from_path = open_image(pathlib.Path(path), N_PX)
    assert np.array_equal(np.asarray(from_file), np.asarray(from_path))
    assert np.array_equal(np.asarray(open_image(str(path), N_PX)), np.asarray(from_path))


# ----------------------------------------------------------------------------------------------------------------
# EXIF orientation


def rotated_with_exif(upright: Image.Image, path: pathlib.Path) -> pathlib.Path:
    """``upright`` stored sideways, with the EXIF orientation (6: turn 90 degrees clockwise) that undoes it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


def test_auto_orient_turns_a_sideways_photo_upright_and_the_default_keeps_the_stored_pixels(tmp_path):
    upright = photo((60, 40))
    stored = rotated_with_exif(upright, tmp_path / "sideways.png")
    assert np.array_equal(np.asarray(open_image(stored, auto_orient=True)), np.asarray(upright))
    assert open_image(stored).size == (40, 60)  # as the original embeds it
    with Image.open(stored) as original:
        assert np.array_equal(np.asarray(open_image(stored)), np.asarray(original))


# ----------------------------------------------------------------------------------------------------------------
# The split of the cores


# (decoding CPU s per image, model CPU s per image, cores) -> (workers, model threads), each worked out by hand:
@pytest.mark.parametrize("decode, model, cores, split", [
    # 12 MP photos on 2 cores (issue 28): split 1 + 1 runs at min(1 / 0.167, 1 / 0.185) = 5.4 images/s; sharing at
    # worst 1 / (0.167 + 0.0925) = 3.9
    (0.167, 0.185, 2, (1, 1)),
    # the same photos decoded at 1/4: split 1 / 0.185 = 5.4; sharing 1 / (0.041 + 0.0925) = 7.5
    (0.041, 0.185, 2, (1, 2)),
    # 0.46 MP images: split 1 / 0.115 = 8.7; sharing 1 / (0.0072 + 0.0575) = 15.5
    (0.0072, 0.115, 2, (1, 2)),
    # 12 MP photos on 16 cores: 8 + 8 gives min(47.9, 43.2) = 43.2, 7 + 9 min(41.9, 48.6) = 41.9, 9 + 7 37.8
    (0.167, 0.185, 16, (8, 8)),
    # one core: nothing to split
    (0.167, 0.185, 1, (1, 1)),
    # decoding that costs nothing measurable: the model keeps every core
    (0.0, 0.1, 4, (1, 4)),
])
def test_split_cores(decode, model, cores, split):
    assert _embed.split_cores(decode, model, cores) == split


def _heavy_decode(image):
    """A preprocess whose decoding costs 20 ms of CPU: its tensor holds the worker's process id."""
    start = time.thread_time()
    while time.thread_time() - start < 0.02:
        pass
    return torch.full((3, 2, 2), float(os.getpid()))


def _light_decode(image):
    return torch.full((3, 2, 2), float(os.getpid()))


def _pictures(tmp_path, count):
    return [str(tmp_path / f"{i}.png") for i in range(count) if Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
            or True]


def test_a_balanced_run_gives_heavy_decoding_more_workers_and_the_model_fewer_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(_embed, "available_cores", lambda: 3)
    paths = _pictures(tmp_path, 16)
    threads = torch.get_num_threads()
    seen, pids = [], []
    for indices, batch, _ in _embed.image_batches(paths, _heavy_decode, 2, 1, balance=True):
        seen += indices
        pids.append({int(value) for value in batch[:, 0, 0, 0]})
        if len(seen) > 2 * _embed.PROBE_BATCHES:  # the model's light, decoding heavy: 2 workers, 1 thread
            assert torch.get_num_threads() == 1
    assert seen == list(range(16))  # every image once, in order, across the switch
    assert len(set.union(*pids[_embed.PROBE_BATCHES:])) == 2
    assert len(set.union(*pids[:_embed.PROBE_BATCHES])) == 1
    assert torch.get_num_threads() == threads  # given back


def test_a_balanced_run_keeps_one_worker_beside_a_model_on_every_core_when_decoding_is_light(tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setattr(_embed, "available_cores", lambda: 4)
    threads = torch.get_num_threads()
    paths = _pictures(tmp_path, 12)
    pids = []
    for _, batch, _ in _embed.image_batches(paths, _light_decode, 2, 1, balance=True):
        time.sleep(0.05)  # the "model": 25 ms per image, next to decoding that costs next to nothing
        pids.append({int(value) for value in batch[:, 0, 0, 0]})
        assert torch.get_num_threads() == threads
    assert len(set.union(*pids[_embed.PROBE_BATCHES:])) == 1


def test_an_unbalanced_run_measures_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise AssertionError("split_cores called")

    monkeypatch.setattr(_embed, "split_cores", fail)
    paths = _pictures(tmp_path, 12)
    assert sum(len(indices) for indices, _, _ in _embed.image_batches(paths, _heavy_decode, 2, 1)) == 12
