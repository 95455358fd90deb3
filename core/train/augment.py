"""Augmentation pipelines on cached square uint8 arrays: SimCLR two-view, fine-tune and eval.

albumentations on NumPy arrays, because on the CPU it is 5-10x faster than torchvision's
tensor transforms. Every pipeline ends in ImageNet normalisation and a 3xSxS float32 tensor.

Random state: albumentations 2.0.8 has two traps. A seed given to `A.Compose(seed=...)` seeds
each child transform with the same number, so e.g. HorizontalFlip and VerticalFlip always fire
together; and a DataLoader pickles the pipeline, generator state included, into every worker,
so all workers (and every epoch) replay the same augmentations. `Pipeline` therefore keeps one
generator shared by all its children, and reseeds it from torch's per-worker seed the first
time it runs in a new worker; `set_random_seed` seeds it in the main process.
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Pipeline:
    """One albumentations pipeline: square uint8 HxWx3 array -> normalised 3xSxS float32 tensor."""

    def __init__(self, name: str, params: dict, transforms: list):
        self.name = name
        self.params = params
        self.compose = A.Compose([*transforms, A.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensorV2()])
        self._worker_seed = None

    def set_random_seed(self, seed: int) -> None:
        """Seed one generator shared by every transform (not one per transform: see module doc)."""
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        _check_image(image, self)
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed  # distinct per worker and per epoch, fixed by torch's seed
            self.set_random_seed(worker.seed)
        return self.compose(image=image)["image"]

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


class TwoViews:
    """SimCLR's input: two independent draws of the same pipeline on one image."""

    def __init__(self, view: Pipeline):
        self.view = view

    def set_random_seed(self, seed: int) -> None:
        self.view.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.view!r})"


def _check_image(image, transform) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{transform!r} takes a uint8 HxWx3 RGB array (as the image cache stores them); got {got}")
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"{transform!r} takes square arrays (the image cache squares them, see data.aspect); "
                         f"got {image.shape[0]}x{image.shape[1]}")


def _color_jitter(strength: float, p: float) -> list:
    """SimCLR's colour distortion of strength s: brightness, contrast, saturation 0.8s, hue 0.2s."""
    if strength <= 0:
        return []
    s = 0.8 * strength
    return [A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=0.2 * strength, p=p)]


def simclr_transform(size: int, crop_min: float = 0.08, color_strength: float = 0.5, blur_prob: float = 0.5,
                     gray_prob: float = 0.2) -> TwoViews:
    """SimCLR's augmentations (Chen et al. 2020), plus a vertical flip: dermoscopy has no up or down.

    The blur kernel is about a tenth of the side (odd; no blur below 20 px, where that is 1),
    sigma in SimCLR's [0.1, 2.0]. Operations with zero strength or probability are left out."""
    kernel = int(0.1 * size) // 2 * 2 + 1
    ops = [
        A.RandomResizedCrop(size=(size, size), scale=(crop_min, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *_color_jitter(color_strength, p=0.8),
        *([A.ToGray(num_output_channels=3, p=gray_prob)] if gray_prob > 0 else []),
        *([A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(0.1, 2.0), p=blur_prob)]
          if blur_prob > 0 and kernel >= 3 else []),
    ]
    params = dict(size=size, crop_min=crop_min, color_strength=color_strength, blur_prob=blur_prob,
                  gray_prob=gray_prob)
    return TwoViews(Pipeline("simclr_view", params, ops))


def finetune_transform(size: int, crop_min: float = 0.6, rotation: float = 30.0,
                       color_strength: float = 0.2) -> Pipeline:
    """Milder, label-preserving augmentation for supervised training.

    Rotation reflects the border instead of padding black, which would look like the dark
    vignette of many dermoscopy images."""
    ops = [
        A.RandomResizedCrop(size=(size, size), scale=(crop_min, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *([A.Rotate(limit=rotation, border_mode=cv2.BORDER_REFLECT_101, p=1.0)] if rotation > 0 else []),
        *_color_jitter(color_strength, p=0.8),
    ]
    params = dict(size=size, crop_min=crop_min, rotation=rotation, color_strength=color_strength)
    return Pipeline("finetune", params, ops)


def eval_transform(size: int) -> Pipeline:
    """Deterministic: resize (area-averaged when shrinking), normalise."""
    return Pipeline("eval", dict(size=size), [A.Resize(size, size, area_for_downscale="image")])
