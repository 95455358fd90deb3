"""The tensor path on CPU tensors: its random parameters against albumentations' (the CPU path),
each operation against a reference, and its batches and wiring into the training tasks."""
from __future__ import annotations

import colorsys

import albumentations as A
import numpy as np
import pytest
import torch
from scipy import stats

from skinclr.train.augment import eval_transform
from skinclr.train.augment_gpu import (DeviceBatches, DeviceImages, TensorPipeline, color_jitter, crop_boxes,
                                       gaussian_blur, geometry, shift_hue, simclr_pipeline, tensor_path)
from skinclr.config import ConfigError, load_config
from skinclr.data.inputs import resolve_inputs

N = 4000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def constant(rgb, n=N, side=4):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, side, side).clone()


def test_crop_scale_and_aspect_ratio_follow_albumentations():
    side, crop_min = 64, 0.08
    ours = crop_boxes(N, side, crop_min, gen()).numpy()
    crop = A.RandomResizedCrop(size=(side, side), scale=(crop_min, 1.0))
    crop.set_random_seed(0)
    theirs = np.array([crop.get_params_dependent_on_data({"shape": (side, side, 3)}, {})["crop_coords"]
                       for _ in range(N)], dtype=np.float64)
    theirs = np.column_stack([theirs[:, 0], theirs[:, 1], theirs[:, 2] - theirs[:, 0], theirs[:, 3] - theirs[:, 1]])
    for name, f in {"area": lambda b: b[:, 2] * b[:, 3] / side**2, "aspect": lambda b: b[:, 2] / b[:, 3],
                    "x0 share": lambda b: b[:, 0] / np.maximum(side - b[:, 2], 1)}.items():
        result = stats.ks_2samp(f(ours), f(theirs))
        assert result.pvalue > 1e-3, f"{name}: KS statistic {result.statistic:.3f}"
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= side).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= side).all()
    assert ours[:, 2:].min() >= 1 and (ours == np.round(ours)).all()  # whole pixels, as albumentations'


def test_a_whole_image_crop_keeps_the_pixels_up_to_independent_flips():
    x = torch.rand(N // 4, 3, 8, 8, generator=gen(1))
    out = geometry(x, 8, crop_min=1.0, rotation=0.0, g=gen(2))
    flipped_x = torch.isclose(out, x.flip(3), atol=1e-5).flatten(1).all(1)
    flipped_y = torch.isclose(out, x.flip(2), atol=1e-5).flatten(1).all(1)
    both = torch.isclose(out, x.flip(2, 3), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    assert (same | flipped_x | flipped_y | both).all()
    for share in (same, flipped_x, flipped_y, both):  # each of the four about a quarter of the time
        assert abs(share.float().mean().item() - 0.25) < 0.05


def test_rotation_mirrors_at_the_border_and_resizes_to_the_requested_side():
    out = geometry(constant((0.3, 0.5, 0.7), n=64, side=16), 24, crop_min=0.3, rotation=30.0, g=gen(3))
    assert out.shape == (64, 3, 24, 24)
    torch.testing.assert_close(out, constant((0.3, 0.5, 0.7), n=64, side=24))  # nothing black comes in


@pytest.mark.parametrize("op", ["brightness", "saturation", "hue"])
def test_jitter_factors_have_albumentations_ranges_and_probability(op):
    s, hue, p = 0.4, 0.1, 0.8
    jitter = A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=hue, p=p)
    colour = (0.5, 0.3, 0.2)
    x = constant(colour)
    kwargs = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, op: hue if op == "hue" else s}
    out = color_jitter(x, p=p, g=gen(4), order=gen(5), **kwargs)[:, :, 0, 0].double()
    if op == "brightness":
        factor, (low, high) = out[:, 0] / colour[0], jitter.brightness
    elif op == "saturation":
        grey = 0.299 * 0.5 + 0.587 * 0.3 + 0.114 * 0.2
        factor, (low, high) = (out[:, 0] - grey) / (colour[0] - grey), jitter.saturation
    else:
        h0 = colorsys.rgb_to_hsv(*colour)[0]
        factor = torch.tensor([(colorsys.rgb_to_hsv(*px)[0] - h0 + 0.5) % 1 - 0.5 for px in out.tolist()])
        (low, high) = jitter.hue
    identity = 0.0 if op == "hue" else 1.0
    moved = (factor - identity).abs() > 1e-4
    assert abs(moved.double().mean().item() - p) < 0.03  # jittered with probability p
    drawn = factor[moved].numpy()
    assert stats.kstest(drawn, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    assert low <= drawn.min() < low + 0.01 and high - 0.01 < drawn.max() <= high


def test_contrast_blends_each_image_with_its_mean_grey():
    x = torch.zeros(N, 3, 2, 2)
    x[:, :, 0] = 0.2
    x[:, :, 1] = 0.6  # half the pixels dark, half bright: mean grey 0.4
    out = color_jitter(x, 0.0, 0.4, 0.0, 0.0, 1.0, gen(6), gen(7))
    factor = (out[:, 0, 1, 0] - out[:, 0, 0, 0]) / 0.4
    torch.testing.assert_close(out.mean((1, 2, 3)), torch.full((N,), 0.4), atol=1e-5, rtol=0)
    assert stats.kstest(factor.numpy(), stats.uniform(0.6, 0.8).cdf).pvalue > 1e-3


def test_hue_shift_matches_colorsys():
    x = torch.rand(50, 3, 1, 1, generator=gen(8))
    shift = torch.rand(50, generator=gen(9)) - 0.5
    out = shift_hue(x, shift)
    for px, s, got in zip(x[:, :, 0, 0].tolist(), shift.tolist(), out[:, :, 0, 0].tolist()):
        h, sat, v = colorsys.rgb_to_hsv(*px)
        assert got == pytest.approx(colorsys.hsv_to_rgb((h + s) % 1, sat, v), abs=1e-5)
    torch.testing.assert_close(shift_hue(x, torch.zeros(50)), x, atol=1e-6, rtol=0)


def test_grayscale_and_blur_fire_with_their_probabilities():
    x = constant((0.6, 0.3, 0.1), n=2000, side=32)
    pipeline = simclr_pipeline(32, crop_min=1.0, color_strength=0.0, blur_prob=0.0, gray_prob=0.2)
    out = pipeline(x.mul(255).byte().permute(0, 2, 3, 1), gen(10), gen(11))
    raw = out * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    grey = (raw.max(1).values - raw.min(1).values < 1e-3).flatten(1).all(1)  # un-normalised, R = G = B
    assert abs(grey.float().mean().item() - 0.2) < 0.03
    spike = torch.zeros(2000, 3, 9, 9)
    spike[:, :, 4, 4] = 1.0
    blurred = gaussian_blur(spike, 5, (0.1, 2.0), 0.5, gen(12))
    changed = blurred[:, 0, 4, 4] < 1 - 1e-4
    assert abs(changed.float().mean().item() - 0.5) < 0.04


def test_blur_matches_albumentations_kernel_and_border_for_a_given_sigma():
    from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d
    from albumentations.augmentations.pixel.functional import separable_convolve

    img = np.random.default_rng(0).random((12, 12, 3), dtype=np.float32)
    expected = separable_convolve(img, create_gaussian_kernel_1d(1.3, 5))
    got = gaussian_blur(torch.from_numpy(img).permute(2, 0, 1)[None], 5, (1.3, 1.3), 1.0, gen())
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_eval_pipeline_equals_the_cpu_eval_transform():
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    got = TensorPipeline(16, train=False)(torch.from_numpy(images), gen(), gen())
    expected = torch.stack([eval_transform(16)(im) for im in images])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def synth_inputs(synth_dir):
    cfg = load_config(None, [f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "train.batch_size=8",
                             "train.max_steps_per_epoch=2", "train.device=cpu", "model.proj_hidden=32",
                             "model.proj_dim=16", "monitor.k=5", "monitor.max_bank=60", "train.epochs=1"], stage="pretrain")
    return cfg, resolve_inputs(cfg, progress=False)


def test_device_batches_repeat_by_seed_and_epoch_and_keep_labels_with_images(synth_inputs):
    cfg, inputs = synth_inputs
    data = DeviceImages(inputs.cache, torch.device("cpu"))
    assert data.images.shape == inputs.cache.images.shape and data.images.dtype == torch.uint8
    rows = inputs.train_rows[:64]
    views = simclr_pipeline(32)

    def epoch(e):
        return list(DeviceBatches(data, rows, views, batch_size=16, seed=3, epoch=e, shuffle=True, drop_last=True,
                                  views=2))

    first, again, other = epoch(1), epoch(1), epoch(2)
    assert len(first) == len(rows) // 16
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0][0], other[0][0][0])
    assert not torch.equal(first[0][0][0], first[0][0][1])  # the two views are separate draws
    plain = list(DeviceBatches(data, rows, TensorPipeline(32, train=False), batch_size=50, seed=0))
    assert sum(len(y) for _, y in plain) == len(rows)  # no drop_last: every row once, in order
    assert torch.equal(torch.cat([y for _, y in plain]), torch.as_tensor(inputs.cache.labels[rows]))
    torch.testing.assert_close(plain[0][0][0], eval_transform(32)(np.array(inputs.cache.images[rows[0]])),
                               atol=1e-5, rtol=0)


def test_training_tasks_take_steps_on_the_tensor_path(synth_inputs):
    from skinclr.train.finetune import Finetuning
    from skinclr.train.methods import METHODS

    cfg, inputs = synth_inputs
    cpu = torch.device("cpu")
    for task in (METHODS["moco_v2"](cfg, inputs), Finetuning(load_config(None, [f"data.root={cfg.data.root}",
                 "data.image_size=32", "train.batch_size=8", "train.device=cpu"], stage="finetune"), inputs)):
        torch.manual_seed(0)
        optimizer = task.setup(cpu, None)
        assert task.data is None  # augment.device=auto on a CPU: albumentations in the loader
        task.use_tensor_path()
        batch = next(iter(task.batches(1)))
        loss, n = task.loss(batch)
        loss.backward()
        optimizer.step()
        assert n == 8 and torch.isfinite(loss)
        metrics = {}
        task.evaluate(cfg.train.epochs, metrics)  # kNN monitor or validation, from the device images
        assert 0.0 <= metrics.get("knn_balanced_accuracy", metrics.get("val_balanced_accuracy")) <= 1.0


def test_augment_device_chooses_the_path():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not tensor_path("cpu", cpu) and not tensor_path("auto", cpu) and not tensor_path("cpu", cuda)
    assert tensor_path("auto", cuda) and tensor_path("cuda", cuda)
    with pytest.raises(ConfigError, match="augment.device=cuda needs training on a CUDA device"):
        tensor_path("cuda", cpu)


def test_compiled_pixel_steps_give_the_eager_pipeline_output():
    """`train.compile` fuses the tensor path's pixel-wise steps; the images it makes are the same."""
    images = torch.randint(0, 256, (6, 24, 24, 3), dtype=torch.uint8)
    eager, fused = (simclr_pipeline(16, color_strength=1.0, gray_prob=0.5, blur_prob=0.5, compile=c) for c in (False, True))
    for seed in (0, 1):  # two batches: two jitter orders, the second reusing the compiled steps
        a = eager(images, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed))
        b = fused(images, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed))
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
