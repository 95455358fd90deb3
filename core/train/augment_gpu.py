"""The tensor path: core/train/augment.py's pipelines as batched tensor operations on the training
device, so a GPU is not left waiting on CPU workers.

The cached uint8 images go to the device once (`DeviceImages`). Each batch is gathered there,
then cropped, resized, flipped and rotated in one `grid_sample`, colour-jittered, grayscaled,
blurred and normalised, with per-image random parameters drawn on the device. The parameters
follow albumentations 2.0.8's distributions (tests/train/test_augment_gpu.py compares them):
RandomResizedCrop's ten tries of area and log aspect ratio with a whole-image fallback, flips
at p = 0.5, a uniform rotation angle, ColorJitter's four uniform factors at probability p,
ToGray's weighted average, GaussianBlur's fixed kernel with uniform sigma. The same code runs
on CPU tensors, which is how the test suite covers it.

Where it differs, on purpose: ColorJitter's random order of its four operations is drawn once
per batch (per image, each image's factors are its own), which keeps one pass per operation;
pixels that a rotation brings in from outside the crop come from the image around it
(mirrored only at the image's border) rather than from a mirror of the crop; and values stay
floats between steps instead of being rounded to uint8 after each.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from skinclr.train.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from skinclr.data.cache import ImageCache
from skinclr.config import ConfigError
from skinclr.data.inputs import Inputs, make_loader

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as cv2's RGB2GRAY
CROP_TRIES = 10
RATIO = (3 / 4, 4 / 3)


def tensor_path(setting: str, device: torch.device) -> bool:
    """Whether augmentation runs as tensor operations on the training device (`augment.device`)."""
    if setting == "cuda" and device.type != "cuda":
        raise ConfigError("augment.device=cuda needs training on a CUDA device (train.device=cuda, or auto "
                          "with a GPU visible); use augment.device=cpu or auto")
    return setting == "cuda" or (setting == "auto" and device.type == "cuda")


class DeviceImages:
    """A cache's uint8 images as one (N, S, S, 3) tensor on a device, copied there once, in chunks."""

    def __init__(self, cache: ImageCache, device: torch.device, chunk: int = 1024):
        src = cache.images
        self.images = torch.empty(src.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(src), chunk):
            self.images[start:start + chunk] = torch.from_numpy(np.array(src[start:start + chunk]))
        self.labels = torch.as_tensor(cache.labels, device=device)
        self.device = device


class TensorPipeline:
    """One pipeline on a batch: uint8 (N, S, S, 3) -> normalised float (N, 3, size, size), channels_last.

    With `train` False it only resizes (area-averaged, when the cache is larger) and normalises,
    as `augment.eval_transform`."""

    def __init__(self, size: int, train: bool = True, crop_min: float = 0.08, rotation: float = 0.0,
                 color_strength: float = 0.0, color_prob: float = 0.8, gray_prob: float = 0.0,
                 blur_prob: float = 0.0, compile: bool = False):
        self.size, self.train, self.crop_min, self.rotation = size, train, crop_min, rotation
        self.color_strength, self.color_prob, self.gray_prob, self.blur_prob = (color_strength, color_prob,
                                                                                gray_prob, blur_prob)
        self.kernel = int(0.1 * size) // 2 * 2 + 1  # as augment.simclr_transform
        # With `train.compile`, each pixel-wise step becomes one fused kernel instead of a pass
        # over the batch per tensor operation (the hue shift alone is about twenty); the random
        # draws stay eager. One graph per step, so the jitter's drawn order never recompiles.
        ops = (JITTER_OPS, grayscale_where, normalise)
        if compile:
            fuse = partial(torch.compile, dynamic=False)
            ops = (tuple(map(fuse, JITTER_OPS)), fuse(grayscale_where), fuse(normalise))
        self.jitter_ops, self.grayscale_where, self.normalise = ops

    def __call__(self, images: Tensor, g: torch.Generator, order: torch.Generator) -> Tensor:
        """`g` draws per-image parameters on the images' device; `order` (a CPU generator) the
        batch's jitter order, so nothing waits on the device."""
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if self.train:
            x = geometry(x, self.size, self.crop_min, self.rotation, g)
            if self.color_strength > 0:
                s = 0.8 * self.color_strength
                x = color_jitter(x, s, s, s, 0.2 * self.color_strength, self.color_prob, g, order, self.jitter_ops)
            if self.gray_prob > 0:
                x = self.grayscale_where(x, _per_image(uniform(len(x), g) < self.gray_prob))
            if self.blur_prob > 0 and self.kernel >= 3:
                x = gaussian_blur(x, self.kernel, (0.1, 2.0), self.blur_prob, g)
        elif x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area" if x.shape[-1] > self.size else "bilinear")
        return self.normalise(x)


def simclr_pipeline(size: int, crop_min=0.08, color_strength=0.5, blur_prob=0.5, gray_prob=0.2,
                    compile: bool = False) -> TensorPipeline:
    """`augment.simclr_transform`'s view (the caller draws it twice for the two views)."""
    return TensorPipeline(size, crop_min=crop_min, color_strength=color_strength, gray_prob=gray_prob,
                          blur_prob=blur_prob, compile=compile)


def finetune_pipeline(size: int, crop_min=0.6, rotation=30.0, color_strength=0.2, compile: bool = False) -> TensorPipeline:
    """`augment.finetune_transform`."""
    return TensorPipeline(size, crop_min=crop_min, rotation=rotation, color_strength=color_strength, compile=compile)


def uniform(n: int, g: torch.Generator, low: float = 0.0, high: float = 1.0, *shape: int) -> Tensor:
    return torch.rand((n, *shape), generator=g, device=g.device) * (high - low) + low


def crop_boxes(n: int, side: int, crop_min: float, g: torch.Generator) -> Tensor:
    """(n, 4) boxes x0, y0, w, h in pixels, as albumentations' RandomResizedCrop draws them:
    area ~ U(crop_min, 1) of the image, log aspect ratio ~ U(log 3/4, log 4/3), sides rounded;
    the first of ten tries that fits, else the whole image; offset uniform over the positions."""
    area = uniform(n, g, crop_min * side * side, side * side, CROP_TRIES)
    ratio = torch.exp(uniform(n, g, math.log(RATIO[0]), math.log(RATIO[1]), CROP_TRIES))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    full = torch.full((n,), float(side), device=g.device)
    w = torch.where(found, w.gather(1, first).squeeze(1), full)
    h = torch.where(found, h.gather(1, first).squeeze(1), full)
    y0 = torch.floor(uniform(n, g) * (side - h + 1))
    x0 = torch.floor(uniform(n, g) * (side - w + 1))
    return torch.stack([x0, y0, w, h], 1)


def geometry(x: Tensor, size: int, crop_min: float, rotation: float, g: torch.Generator) -> Tensor:
    """Random resized crop, horizontal and vertical flips and rotation, as one affine resampling.

    Bilinear, sampling at pixel centres as cv2.resize does; outside the image, mirrored."""
    n, side = len(x), x.shape[-1]
    x0, y0, w, h = crop_boxes(n, side, crop_min, g).unbind(1)
    flip_x = torch.where(uniform(n, g) < 0.5, -1.0, 1.0)
    flip_y = torch.where(uniform(n, g) < 0.5, -1.0, 1.0)
    angle = uniform(n, g, -rotation, rotation) * (math.pi / 180) if rotation > 0 else torch.zeros(n, device=x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = w / side * flip_x, h / side * flip_y  # half-extent of the box in [-1, 1] coordinates
    cx, cy = (2 * x0 + w) / side - 1, (2 * y0 + h) / side - 1
    theta = torch.stack([torch.stack([sx * cos, -sx * sin, cx], 1), torch.stack([sy * sin, sy * cos, cy], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gray(x: Tensor) -> Tensor:
    """Luma, repeated over the three channels."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1).expand_as(x)


def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate each image's hue by `shift` turns in HSV, keeping value and saturation."""
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    hue = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.remainder(hue / 6 + shift.view(-1, 1, 1), 1.0) * 6
    k = torch.remainder(x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + hue.unsqueeze(1), 6)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _per_image(f)).clamp(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    f = _per_image(f)
    return (x * f + gray(x).mean((1, 2, 3), keepdim=True) * (1 - f)).clamp(0, 1)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    f = _per_image(f)
    return (x * f + gray(x) * (1 - f)).clamp(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    return shift_hue(x, shift).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's order


def grayscale_where(x: Tensor, chosen: Tensor) -> Tensor:
    return torch.where(chosen, gray(x), x)


def normalise(x: Tensor) -> Tensor:
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float, p: float,
                 g: torch.Generator, order: torch.Generator, ops=JITTER_OPS) -> Tensor:
    """ColorJitter: factors U[max(0, 1-b), 1+b] (brightness, contrast, saturation) and hue shift U[-h, h],
    each image jittered with probability p, clipped to [0, 1] after each operation (`ops`: JITTER_OPS,
    compiled or not)."""
    n = len(x)
    on = uniform(n, g) < p

    def factor(s: float) -> Tensor:
        return torch.where(on, uniform(n, g, max(0.0, 1 - s), 1 + s), 1.0)

    params = (factor(brightness), factor(contrast), factor(saturation), torch.where(on, uniform(n, g, -hue, hue), 0.0))
    for i in torch.randperm(4, generator=order).tolist():
        x = ops[i](x, params[i])
    return x


def gaussian_blur(x: Tensor, kernel: int, sigma: tuple[float, float], p: float, g: torch.Generator) -> Tensor:
    """Separable Gaussian blur of a fixed odd kernel, sigma ~ U(sigma) per image, with probability p;
    borders mirrored without repeating the edge (cv2's default)."""
    n, c, hgt, wid = x.shape
    s = uniform(n, g, *sigma)
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.exp(-0.5 * (taps / s.unsqueeze(1)) ** 2)
    weights = weights / weights.sum(1, keepdim=True)
    identity = (taps == 0).to(x.dtype).expand(n, kernel)
    weights = torch.where((uniform(n, g) < p).unsqueeze(1), weights, identity).repeat_interleave(c, 0)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, hgt, wid)


class DeviceBatches:
    """An epoch of batches made on the device: the tensor path's DataLoader. Order and augmentation
    depend only on (seed, epoch), so a resumed epoch replays exactly what it would have seen."""

    def __init__(self, data: DeviceImages, rows: np.ndarray, pipeline: TensorPipeline, *, batch_size: int,
                 seed: int, epoch: int = 0, shuffle: bool = False, drop_last: bool = False, views: int = 1,
                 weights: Tensor | None = None):
        self.data, self.pipeline, self.batch_size = data, pipeline, batch_size
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=data.device)
        self.seed = seed * 100_003 + epoch
        self.shuffle, self.drop_last, self.views, self.weights = shuffle, drop_last, views, weights

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator:
        device = self.data.device
        g = torch.Generator(device).manual_seed(self.seed)
        order = torch.Generator().manual_seed(self.seed)
        n = len(self.rows)
        if self.weights is not None:  # each class equally often in expectation, as WeightedRandomSampler
            pick = torch.multinomial(self.weights.to(device), n, replacement=True, generator=g)
        elif self.shuffle:
            pick = torch.randperm(n, generator=g, device=device)
        else:
            pick = torch.arange(n, device=device)
        for i in range(len(self)):
            rows = self.rows[pick[i * self.batch_size:(i + 1) * self.batch_size]]
            images, labels = self.data.images[rows], self.data.labels[rows]
            if self.views == 1:
                yield self.pipeline(images, g, order), labels
            else:
                yield tuple(self.pipeline(images, g, order) for _ in range(self.views)), labels


def eval_batches(inputs: Inputs, rows: np.ndarray, size: int, data: DeviceImages | None = None, batch_size: int = 256):
    """Unaugmented batches of cache rows in order, for inference: made on the device when the
    images are there (the tensor path), else by the CPU loader."""
    if data is not None:
        return DeviceBatches(data, rows, TensorPipeline(size, train=False), batch_size=batch_size, seed=0)
    return make_loader(inputs.cache, rows, eval_transform(size), batch_size=batch_size, seed=0)
