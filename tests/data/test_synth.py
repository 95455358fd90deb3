"""The synthetic dataset: the official layout, lesions seen several times, reproducible."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from skinclr.data.manifest import check_folder, read_manifest
from skinclr.data.manifest import TRAINING_INPUT
from skinclr.names import CLASSES
from skinclr.data.problems import DataError
from skinclr.data.synth import MARKER, make_synthetic


def test_layout_passes_the_full_check(synth_dir):
    manifest, problems, warnings = check_folder(synth_dir, progress=False)
    assert problems == [] and warnings == []
    assert manifest.layout == "isic2018-training" and len(manifest.frame) == 280
    assert (synth_dir / TRAINING_INPUT / "LICENSE.txt").is_file()
    with Image.open(manifest.frame["path"][0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (200, 150))


def test_lesions_have_several_views(synth_dir):
    views = read_manifest(synth_dir).frame["lesion_id"].value_counts()
    assert views.min() >= 1 and views.max() == 4
    assert (views > 1).sum() > len(views) / 3


def test_every_class_present_and_nv_most_common(synth_dir):
    counts = read_manifest(synth_dir).class_counts()
    assert min(counts.values()) > 0
    assert max(counts, key=counts.get) == "NV"
    assert counts["NV"] < len(CLASSES) * min(counts.values()) * 2  # imbalanced, mildly


def test_every_class_present_even_when_tiny(tmp_path):
    assert min(read_manifest(make_synthetic(tmp_path / "s", n=7)).class_counts().values()) == 1


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_synthetic(tmp_path / "a", n=24, seed=5)
    b = make_synthetic(tmp_path / "b", n=24, seed=5)
    c = make_synthetic(tmp_path / "c", n=24, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    ours, theirs = sorted((a / TRAINING_INPUT).glob("*.jpg")), sorted((c / TRAINING_INPUT).glob("*.jpg"))
    assert not {p.name for p in ours} & {p.name for p in theirs}  # another seed: other images under other ids
    assert ours[0].read_bytes() != theirs[0].read_bytes()


def test_rerun_keeps_the_existing_set(tmp_path):
    out = make_synthetic(tmp_path / "s", n=20, seed=1)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert make_synthetic(out, n=20, seed=1) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    assert json.loads((out / MARKER).read_text()) == {"n": 20, "seed": 1}


def test_refuses_a_folder_holding_something_else(tmp_path):
    make_synthetic(tmp_path / "s", n=20, seed=1)
    with pytest.raises(DataError, match="n=20, seed=1"):
        make_synthetic(tmp_path / "s", n=30, seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="other"):
        make_synthetic(tmp_path / "other", n=20)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_writes_into_an_empty_folder(tmp_path):
    (tmp_path / "s").mkdir()
    assert len(read_manifest(make_synthetic(tmp_path / "s", n=10)).frame) == 10


def test_a_set_is_the_same_file_for_file_however_many_processes_draw_it(tmp_path, monkeypatch):
    """Each lesion draws from its own seed, so sharing the lesions among processes changes nothing."""
    from skinclr.data import synth

    from concurrent.futures import ProcessPoolExecutor

    sets = {}
    for workers in (1, 3):
        monkeypatch.setattr(synth, "default_workers", lambda workers=workers: workers)
        sets[workers] = make_synthetic(tmp_path / str(workers), n=320, seed=4)
    with ProcessPoolExecutor(2) as pool:  # the caller's processes, as the quickstart starts them
        sets["pool"] = make_synthetic(tmp_path / "pool", n=320, seed=4, pool=pool)
    files = sorted(p.relative_to(sets[1]) for p in sets[1].rglob("*") if p.is_file())
    assert len(files) == 320 + 4  # the images, the licence, the two tables and the marker
    for other in (3, "pool"):
        assert files == sorted(p.relative_to(sets[other]) for p in sets[other].rglob("*") if p.is_file())
        assert all((sets[1] / f).read_bytes() == (sets[other] / f).read_bytes() for f in files)
