"""Augmentation pipelines on real lesion images, shaped as the image cache stores them."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from skinclr.train.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, finetune_transform, simclr_transform

pytestmark = pytest.mark.real_data


def _square(path, side: int) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    w, h = im.size
    m = min(w, h)
    im = im.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m))
    return np.asarray(im.resize((side, side), Image.BILINEAR))


@pytest.fixture(scope="module")
def lesions(real_data_dir):
    files = sorted((real_data_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:4]
    return {side: [_square(f, side) for f in files] for side in (64, 150)}


def _normalised(image: np.ndarray) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255 - mean) / std


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _flips(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}


@pytest.mark.parametrize("make", [lambda s: simclr_transform(s).view, lambda s: finetune_transform(s), eval_transform])
@pytest.mark.parametrize("side", [64, 150])
def test_output_is_a_normalised_float_tensor_of_the_requested_size(lesions, make, side):
    out = make(32)(lesions[side][0])
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # ImageNet normalisation maps [0, 255] into [(0 - mean) / std, (1 - mean) / std]
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (out.amin((1, 2)) >= low - 1e-5).all() and (out.amax((1, 2)) <= high + 1e-5).all()


def test_eval_is_deterministic_normalisation_and_resizes_larger_arrays(lesions):
    image = lesions[64][0]
    t = eval_transform(64)
    torch.testing.assert_close(t(image), _normalised(image))
    assert torch.equal(t(image), t(image))
    big = eval_transform(64)(lesions[150][0])
    assert big.shape == (3, 64, 64) and torch.equal(big, eval_transform(64)(lesions[150][0]))


def test_two_views_are_independent_draws(lesions):
    views = simclr_transform(64)
    for image in lesions[64]:
        v1, v2 = views(image)
        assert v1.shape == v2.shape == (3, 64, 64)
        assert not torch.equal(v1, v2)


@pytest.mark.parametrize("make", [
    lambda: simclr_transform(64, crop_min=1.0, color_strength=0.0, blur_prob=0.0, gray_prob=0.0).view,
    lambda: finetune_transform(64, crop_min=1.0, rotation=0.0, color_strength=0.0),
])
def test_full_crop_without_colour_keeps_the_image_up_to_independent_flips(lesions, make):
    image = lesions[64][1]
    t = make()
    t.set_random_seed(0)
    flips = {name: _normalised(np.ascontiguousarray(f)) for name, f in _flips(image).items()}
    seen = set()
    for _ in range(40):
        out = t(image)
        match = [name for name, ref in flips.items() if torch.allclose(out, ref, atol=1e-5)]
        assert match, "output is not the input up to a flip"
        seen.add(match[0])
    assert seen == set(flips), f"horizontal and vertical flips must be drawn independently; saw only {seen}"


@pytest.mark.parametrize("make", [lambda: simclr_transform(48), lambda: finetune_transform(48)])
def test_set_random_seed_makes_draws_repeatable(lesions, make):
    image = lesions[150][2]

    def draws(seed) -> torch.Tensor:
        t = make()
        t.set_random_seed(seed)
        return torch.stack([x for _ in range(3) for x in _tensors(t(image))])

    assert torch.equal(draws(1), draws(1))
    assert not torch.equal(draws(1), draws(2))


def test_pickle_round_trip_keeps_the_pipeline(lesions):
    image = lesions[64][0]
    for t in (simclr_transform(32), finetune_transform(32), eval_transform(32)):
        t.set_random_seed(3)
        copy = pickle.loads(pickle.dumps(t))
        assert repr(copy) == repr(t)
        assert all(torch.equal(x, y) for x, y in zip(_tensors(t(image)), _tensors(copy(image))))


class _Repeat(torch.utils.data.Dataset):
    """One image many times: any two equal outputs mean repeated random draws."""

    def __init__(self, image, transform, n=8):
        self.image, self.transform, self.n = image, transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(self.image)


def _epoch(loader) -> torch.Tensor:
    return torch.cat([torch.cat([v1, v2]) for v1, v2 in loader]).flatten(1)


@pytest.mark.slow
def test_dataloader_workers_draw_distinct_repeatable_augmentations(lesions):
    loader = torch.utils.data.DataLoader(_Repeat(lesions[64][0], simclr_transform(32)), batch_size=2, num_workers=2)
    torch.manual_seed(0)
    first, second = _epoch(loader), _epoch(loader)
    assert len(torch.unique(first, dim=0)) == len(first), "two workers or two views repeated an augmentation"
    assert not torch.equal(first, second), "the second epoch replayed the first"
    torch.manual_seed(0)
    assert torch.equal(_epoch(loader), first), "same torch seed, different augmentations"


def test_readable_repr():
    assert repr(simclr_transform(64, crop_min=0.2)) == (
        "TwoViews(simclr_view(size=64, crop_min=0.2, color_strength=0.5, blur_prob=0.5, gray_prob=0.2))")
    assert repr(finetune_transform(96)) == "finetune(size=96, crop_min=0.6, rotation=30.0, color_strength=0.2)"
    assert repr(eval_transform(64)) == "eval(size=64)"


@pytest.mark.parametrize("bad, says", [
    (np.zeros((64, 64, 3), np.float32), "float32"),
    (np.zeros((64, 64), np.uint8), r"\(64, 64\)"),
    (np.zeros((64, 48, 3), np.uint8), "64x48"),
    ([[0]], "list"),
])
def test_bad_input_is_named(bad, says):
    with pytest.raises(ValueError, match=says):
        simclr_transform(32)(bad)
