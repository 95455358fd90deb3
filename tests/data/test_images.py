"""Decoding: every image mode becomes HxWx3 uint8 RGB."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skinclr.data.images import load_rgb


def _modes():
    grey = np.full((6, 8), 100, np.uint8)
    rgb = np.zeros((6, 8, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    rgba = np.dstack([rgb, np.full((6, 8), 40, np.uint8)])
    return {
        "L": (Image.fromarray(grey), "png", (100, 100, 100)),
        "LA": (Image.fromarray(grey).convert("LA"), "png", (100, 100, 100)),
        "P": (Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), "png", (10, 20, 30)),
        "RGBA": (Image.fromarray(rgba), "png", (10, 20, 30)),
        "CMYK": (Image.new("CMYK", (8, 6), (0, 0, 0, 0)), "jpg", (255, 255, 255)),
        "I;16": (Image.fromarray(np.full((6, 8), 65535, np.uint16)), "png", (255, 255, 255)),
        "PNG named .jpg": (Image.fromarray(rgb), "png", (10, 20, 30)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_load_rgb_converts_every_mode_to_rgb(tmp_path, mode):
    img, fmt, expected = _modes()[mode]
    path = tmp_path / "image.jpg" if mode == "PNG named .jpg" else tmp_path / f"image.{fmt}"
    img.save(path, format="PNG" if fmt == "png" else "JPEG")
    rgb = load_rgb(path)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).max() <= 2


def test_a_named_pipe_is_refused_at_once_not_read_forever(tmp_path):
    """A FIFO (or a folder, a device) is no image file: opening it to read would block forever."""
    import os

    from skinclr.data.images import decode_input
    from skinclr.data.problems import DataError

    pipe = tmp_path / "lesion.jpg"
    os.mkfifo(pipe)
    for source in (pipe, str(pipe)):
        with pytest.raises(DataError, match="is a named pipe, not an image file"):
            decode_input(source)
    with pytest.raises(DataError, match="is a folder"):
        load_rgb(tmp_path)


def test_a_missing_path_without_an_extension_is_named_as_a_missing_file(tmp_path):
    """`photos/lesion1` reads as base64 text too; holding no image, it is taken for the path it is."""
    import base64
    import io

    from skinclr.data.images import decode_input
    from skinclr.data.problems import DataError

    for missing in ("photos/lesion1", str(tmp_path / "lesion2"), "ISIC0024306"):
        with pytest.raises(DataError, match="file does not exist"):
            decode_input(missing)
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 80, 60)).save(buffer, format="PNG")
    assert decode_input(base64.b64encode(buffer.getvalue()).decode()).shape == (20, 20, 3)


def test_a_copy_hash_finds_an_image_again_after_re_encoding_and_tells_others_apart(real_data_dir):
    """The threshold's premise on real images: a JPEG re-encoding stays within COPY_DISTANCE bits
    of its original, while every other image of the sample lies beyond it."""
    import io

    from skinclr.data.images import COPY_DISTANCE, copy_distances, copy_hash, fit_square

    paths = sorted((real_data_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:40]
    squares = [fit_square(load_rgb(p), 64) for p in paths]
    originals = [copy_hash(s) for s in squares]
    copies = []
    for path in paths:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=70)
        copies.append(copy_hash(fit_square(load_rgb_bytes(buffer.getvalue()), 64)))
    d = copy_distances(copies, originals)
    assert d.shape == (40, 40) and len(originals[0]) == 64  # 256 bits as hex
    assert (d.diagonal() <= COPY_DISTANCE).all()
    off = d[~np.eye(40, dtype=bool)]
    assert (off > COPY_DISTANCE).all() and copy_distances(originals[:1], originals[:1])[0, 0] == 0


def load_rgb_bytes(data: bytes) -> np.ndarray:
    from skinclr.data.images import decode_input

    return decode_input(data)
