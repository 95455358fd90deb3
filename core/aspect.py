"""How an image becomes the square network input: the aspect policies, their check, fit_square.

ISIC images are 4:3; a policy crops the long side (center_crop), letterboxes the image (pad) or
stretches it (stretch). The training cache and the served model both square images here, so a
model sees the same pixels when it serves as when it trained.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from core.problems import DataError

ASPECTS = ("center_crop", "pad", "stretch")


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
