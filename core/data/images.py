"""Decoding an image, whatever its file type, mode or orientation, into HxWx3 uint8 RGB, and
making it the square network input.

Training reads images through here once, into the cache (core/data/cache.py); serving decodes
what it is sent (a path, base64 text, encoded bytes or an array) through here too, so a broken
file fails with the same message wherever it is met, and a model sees the same pixels when it
serves as when it trained. ISIC images are 4:3; an aspect policy crops the long side
(center_crop), letterboxes the image (pad) or stretches it (stretch).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps
from skinclr.config_schema import ASPECTS
from skinclr.data.problems import DataError

# A truncated file must fail validation, not be padded with grey and trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what a folder's image files are named
# What an encoded image starts with: JPEG, PNG, GIF, BMP, TIFF (both byte orders), WebP's RIFF.
IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


def load_rgb(path) -> np.ndarray:
    """Fully decode an image file into an HxWx3 uint8 RGB array, whatever its mode or suffix.

    Only a regular file is opened: a named pipe would block the read forever."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None  # opening it says why
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else "a device or socket"
        raise DataError(f"{path}: is {kind}, not an image file; give a JPEG or PNG file")
    try:
        return decode_image(path)
    except DECODE_ERRORS as err:
        raise DataError(f"{path}: {decode_reason(path, err)}; replace or remove the file") from None


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_image(source) -> np.ndarray:
    """Decode a file path or a binary stream (e.g. a served request's bytes) to RGB uint8."""
    with Image.open(source) as img:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


def image_files(items: list[str]) -> list[str]:
    """Image paths as given, each folder among them replaced by its JPEG and PNG files (sorted; not
    its subfolders): the challenge's test images come as one folder, beside a licence file."""
    out = []
    for item in items:
        if not Path(item).is_dir():
            out.append(item)
            continue
        found = sorted(str(f) for f in Path(item).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            raise DataError(f"{item}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)}); give image files "
                            "or a folder of them")
        out.extend(found)
    return out


def decode_input(item: Any, index: int = 0) -> np.ndarray:
    """One input image as an HxWx3 uint8 RGB array.

    An array is taken as it is; a string is a file path when such a file exists or it does not
    look like base64, else base64 of an encoded image (the form images take over REST); bytes
    are an encoded image. Files go through the data layer, so a broken one fails as in training.
    """
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise DataError(f"image {index}: expected a uint8 HxWx3 RGB array, got {item.dtype} of shape {item.shape}")
        return np.ascontiguousarray(item)
    if isinstance(item, Path):
        return load_rgb(item)
    if isinstance(item, str):
        if not _BASE64.fullmatch(item) or _exists(item):
            return load_rgb(item)
        try:
            data = base64.b64decode(item, validate=False)
        except binascii.Error as err:
            if _path_like(item):  # not base64 after all: the path it looks like
                return load_rgb(item)  # "file does not exist", naming it
            raise DataError(f"image {index}: {item[:40]!r}... is neither an existing file nor valid base64 "
                            f"({err})") from None
        if not data.startswith(IMAGE_MAGIC) and _path_like(item) and "/" in item:  # a folder/name, no image
            return load_rgb(item)
        return _decode_bytes(data, f"image {index} (base64, {len(item)} characters)")
    if isinstance(item, (bytes, bytearray)):
        return _decode_bytes(bytes(item), f"image {index} ({len(item)} bytes)")
    raise DataError(f"image {index}: a {type(item).__name__}; give a file path, a base64-encoded JPEG/PNG string, "
                    "encoded image bytes or a uint8 HxWx3 array")


def _exists(text: str) -> bool:
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # a base64 string longer than a file name may be
        return False


def _path_like(text: str) -> bool:
    """Text that could be base64 or a path is taken for a path when it is short and unpadded (an
    encoded image is longer, or ends in `=` padding): when it does not decode, or when it names a
    folder (`photos/lesion1`) and decodes to no image."""
    return len(text) <= 255 and not text.rstrip().endswith("=")


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    try:
        return decode_image(io.BytesIO(data))
    except DECODE_ERRORS as err:
        raise DataError(f"{name}: not a readable image ({err}); send a whole JPEG or PNG file, base64-encoded, "
                        "or a path to an existing file") from None


def decode_reason(path: Path, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file does not exist"
    if path.is_file() and path.stat().st_size == 0:
        return "file is empty"
    if "truncated" in str(err):
        return f"image is truncated ({err})"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a readable image (corrupt or not an image format)"
    return f"cannot decode image ({err})"


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey: scale the full range down; a plain convert() would clip at 255.
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


MIN_SIDE = 16  # pixels on the short side: data.image_size is at least this, and a lesion needs it
MAX_ASPECT = 4.0  # a longer image squares into a sliver of itself


def image_doubt(img: Image.Image) -> str | None:
    """Why an image that decodes is still no lesion picture to train on; None when it may be one."""
    w, h = img.size
    side = min(w, h)
    if side < MIN_SIDE or max(w, h) > MAX_ASPECT * side:
        why = (f"a lesion picture needs at least {MIN_SIDE} pixels on its short side" if side < MIN_SIDE else
               f"{100 * side / max(w, h):.0f}% of its length")
        return f"{w}x{h} pixels: squared by its centre crop (data.aspect=center_crop) it keeps {side}x{side}; {why}"
    if "A" in img.getbands() or "transparency" in img.info:
        if img.convert("RGBA").getchannel("A").getextrema()[1] == 0:
            return "fully transparent: every pixel decodes to black"
    return None


def _inspect(paths: list[str]) -> list[tuple[str, str, bool]]:
    """Worker: (path, reason, fatal) for every file in the chunk that does not decode (fatal) or
    decodes into no lesion picture (a doubt)."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                doubt = image_doubt(img)
                _to_rgb(img)
        except DECODE_ERRORS as err:
            out.append((p, decode_reason(Path(p), err), True))
            continue
        if doubt:
            out.append((p, doubt, False))
    return out


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def inspect_images(paths: list[str], workers: int | None,
                   progress: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Decode every file in a process pool (JPEG decoding is CPU bound and holds the GIL):
    (path, reason) of the files that do not decode, and of those that are no lesion picture."""
    from tqdm.auto import tqdm

    workers = workers or default_workers()
    bar = tqdm(total=len(paths), desc="decoding", unit="img", disable=not progress)
    bad: list[tuple[str, str, bool]] = []
    if workers <= 1 or len(paths) < 256:
        for chunk in _chunks(paths, 64):
            bad += _inspect(chunk)
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(workers) as pool:
            jobs = {pool.submit(_inspect, c): len(c) for c in _chunks(paths, 128)}
            for job in as_completed(jobs):
                bad += job.result()
                bar.update(jobs[job])
    bar.close()
    bad.sort()
    return [(p, why) for p, why, fatal in bad if fatal], [(p, why) for p, why, fatal in bad if not fatal]




def aspect_problem(aspect: str) -> str | None:
    """Why `aspect` names no policy, or None when it names one."""
    if aspect in ASPECTS:
        return None
    return f"aspect {aspect!r} is not one of {', '.join(ASPECTS)}"


def fit_square(rgb: np.ndarray, size: int, aspect: str = "center_crop") -> np.ndarray:
    """An HxWx3 image as SxSx3, in one resampling step (antialiased bicubic) whatever the policy."""
    img = Image.fromarray(rgb)
    w, h = img.size
    bicubic = Image.Resampling.BICUBIC
    if aspect == "center_crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(img.resize((size, size), bicubic, box=box))
    if aspect == "stretch":
        return np.asarray(img.resize((size, size), bicubic))
    if aspect == "pad":
        scale = size / max(w, h)
        inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), bicubic)
        out = Image.new("RGB", (size, size))
        out.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return np.asarray(out)
    raise DataError(aspect_problem(aspect))


COPY_HASH_SIDE = 16  # the 16x16 lowest frequencies of the grey square's DCT: 256 bits
# Bits apart that still make a copy. Measured on the 10,015 real training images at 64 px
# (tests/benchmarks/bench_copies.py): of the 50 million pairs of images of different lesions, one
# comes within 24 bits (14), and it is one lesion photographed twice under two lesion ids
# (ISIC_0025226, ISIC_0030074); re-saved at JPEG quality 70, 300 sampled images moved 4 bits
# (median) and 18 at most.
COPY_DISTANCE = 24
_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II as a matrix: `m @ x @ m.T` transforms a square."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.sqrt(2 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(64)


def copy_hash(square: np.ndarray) -> str:
    """A perceptual hash of an image as a model sees it (its square): which of its lowest
    frequencies lie above their median. Re-encoded or resized, an image stays within
    COPY_DISTANCE bits; other images land about half the bits away."""
    grey = np.asarray(Image.fromarray(square).convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:COPY_HASH_SIDE, :COPY_HASH_SIDE].flatten()
    return np.packbits(low > np.median(low[1:])).tobytes().hex()


def file_copy_hash(path, size: int, aspect: str) -> str:
    """The copy hash of an image file as a model of this `size` and `aspect` saw it: its square."""
    return copy_hash(fit_square(load_rgb(path), size, aspect))


def copy_distances(hashes: list[str], known: list[str]) -> np.ndarray:
    """Bits apart, for every pair of a hash in `hashes` and one in `known`: (len(hashes), len(known))."""
    def unpack(values: list[str]) -> np.ndarray:
        return np.frombuffer(bytes.fromhex("".join(values)), dtype=np.uint8).reshape(len(values), -1)

    a, b = unpack(hashes), unpack(known)
    out = np.empty((len(a), len(b)), dtype=np.uint16)
    for i in range(0, len(a), 256):  # 256 x N x 32 bytes at a time
        out[i:i + 256] = _BITS[a[i:i + 256, None, :] ^ b[None, :, :]].sum(axis=-1)
    return out
