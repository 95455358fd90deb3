"""The decoded-image cache: right pixels in manifest order, built once, never half-trusted."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from skinclr.data.images import fit_square
from skinclr.data.cache import CachedDataset, build_cache, cache_key, cache_root, open_cache
from skinclr.data.manifest import read_manifest
from skinclr.data.images import load_rgb
from skinclr.data.manifest import TRAINING_INPUT
from skinclr.data.problems import DataError


@pytest.fixture
def manifest(synth_dir):
    return read_manifest(synth_dir)


@pytest.fixture
def own_copy(synth_dir, tmp_path):
    """A synthetic set this test may damage."""
    return shutil.copytree(synth_dir, tmp_path / "isic")


def test_default_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SKINCLR_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SKINCLR_CACHE")
    assert cache_root().parts[-2:] == (".cache", "skinclr")


def test_shapes_order_and_read_only(manifest, tmp_path):
    cache = build_cache(manifest, 32, cache_dir=tmp_path, progress=False)
    assert cache.images.shape == (280, 32, 32, 3) and cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    assert cache.ids == manifest.frame["image"].tolist()
    assert cache.labels.dtype == np.int64 and (cache.labels == manifest.frame["label"].to_numpy()).all()
    assert cache.path == tmp_path / cache_key(manifest, 32, "center_crop")
    assert (cache.rows(["ISIC_9000007", cache.ids[0]]) == [cache.ids.index("ISIC_9000007"), 0]).all()
    with pytest.raises(DataError, match="ISIC_0000000"):
        cache.rows(["ISIC_0000000"])
    sent = pickle.dumps(cache)  # e.g. to a Ray trial: the path travels, not the pixels
    assert len(sent) < cache.images.nbytes / 10
    assert np.array_equal(pickle.loads(sent).images, cache.images)


@pytest.mark.parametrize("aspect", ["center_crop", "pad", "stretch"])
def test_rows_hold_each_image_resized(manifest, tmp_path, aspect):
    cache = build_cache(manifest, 48, aspect, cache_dir=tmp_path, progress=False, workers=2)
    for i in (0, 137, 279):
        assert np.array_equal(cache.images[i], fit_square(load_rgb(manifest.frame["path"][i]), 48, aspect))


def test_fit_square_policies_on_a_real_image(real_data_dir):
    rgb = load_rgb(next((real_data_dir / TRAINING_INPUT).glob("*.jpg")))
    assert rgb.shape == (150, 200, 3)
    crop = fit_square(rgb, 60).astype(int)
    reference = np.asarray(Image.fromarray(rgb[:, 25:175]).resize((60, 60), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(crop - reference)[1:-1, 1:-1].max() <= 2  # the same crop; edges differ by filter support only
    pad = fit_square(rgb, 60, "pad")
    assert pad[:7].max() == 0 and pad[-7:].max() == 0 and pad[8:52].min(axis=(0, 2)).max() > 0  # 45 rows of image
    stretch = fit_square(rgb, 60, "stretch").astype(int)
    assert np.abs(stretch.mean() - rgb.mean()) < 2


def test_second_build_reuses_without_decoding(own_copy, tmp_path):
    manifest = read_manifest(own_copy)
    first = build_cache(manifest, 32, cache_dir=tmp_path / "c", progress=False)
    stamp = (first.path / "images.u8").stat().st_mtime_ns
    shutil.rmtree(own_copy / TRAINING_INPUT)  # nothing left to decode
    second = build_cache(manifest, 32, cache_dir=tmp_path / "c", progress=False)
    assert second.path == first.path and (second.path / "images.u8").stat().st_mtime_ns == stamp
    assert np.array_equal(second.images, first.images)


def test_other_size_or_aspect_is_another_cache(manifest, tmp_path):
    paths = {build_cache(manifest, s, a, cache_dir=tmp_path, progress=False).path
             for s, a in [(32, "center_crop"), (40, "center_crop"), (32, "pad")]}
    assert len(paths) == 3


def test_killed_build_is_never_trusted(manifest, tmp_path):
    key = cache_key(manifest, 32, "center_crop")
    half = tmp_path / key  # a directory without meta.json, e.g. from an older, killed build
    half.mkdir()
    (half / "images.u8").write_bytes(b"\x07" * 100)
    leftover = tmp_path / f".{key}.tmp-99999-deadbeef"
    leftover.mkdir()
    with pytest.raises(DataError, match="not a usable image cache"):
        open_cache(half)
    cache = build_cache(manifest, 32, cache_dir=tmp_path, progress=False)
    assert not leftover.exists()
    assert np.array_equal(cache.images[5], fit_square(load_rgb(manifest.frame["path"][5]), 32))


def test_decode_failure_names_the_file_and_leaves_no_cache(own_copy, tmp_path):
    manifest = read_manifest(own_copy)
    bad = manifest.frame["path"][200]
    good = open(bad, "rb").read()
    open(bad, "wb").write(good[: len(good) // 3])
    with pytest.raises(DataError, match=manifest.frame["image"][200]):
        build_cache(manifest, 32, cache_dir=tmp_path / "c", progress=False, workers=2)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [f"{cache_key(manifest, 32, 'center_crop')}.lock"]
    open(bad, "wb").write(good)
    assert build_cache(manifest, 32, cache_dir=tmp_path / "c", progress=False).images.shape[0] == 280


def _build_in_child(root, cache_dir, start, results):
    manifest = read_manifest(root)
    start.wait()
    cache = build_cache(manifest, 40, cache_dir=cache_dir, progress=False, workers=2)
    results.put((str(cache.path), int(cache.images.astype(np.int64).sum())))


@pytest.mark.slow
def test_concurrent_builds_both_succeed(synth_dir, tmp_path):
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_build_in_child, args=(synth_dir, tmp_path, start, results)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    assert [child.exitcode for child in children] == [0, 0]
    first, second = results.get(timeout=5), results.get(timeout=5)
    assert first == second
    manifest = read_manifest(synth_dir)
    cache = build_cache(manifest, 40, cache_dir=tmp_path, progress=False)
    assert str(cache.path) == first[0] and int(cache.images.astype(np.int64).sum()) == first[1]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)


def two_views(img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = to_tensor(img)
    return t, t.flip(2)


def test_dataset_in_a_loader_with_workers(manifest, tmp_path):
    cache = build_cache(manifest, 32, cache_dir=tmp_path, progress=False)
    rows = np.arange(3, 280, 4)
    dataset = CachedDataset(cache, rows, to_tensor)
    dataset[0]  # the parent has opened its map: workers must not receive a copy of the pixels
    assert len(pickle.dumps(dataset)) < cache.images[0].nbytes * 10
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)
    images, labels = zip(*loader)
    assert torch.equal(torch.cat(images), torch.from_numpy(np.asarray(cache.images[rows])).permute(0, 3, 1, 2))
    assert torch.equal(torch.cat(labels), torch.from_numpy(cache.labels[rows]))

    (a, b), label = next(iter(torch.utils.data.DataLoader(CachedDataset(cache, rows, two_views), batch_size=8,
                                                          num_workers=2)))
    assert a.shape == b.shape == (8, 3, 32, 32) and torch.equal(a.flip(3), b) and len(label) == 8
