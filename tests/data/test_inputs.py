"""A run's inputs: resolved from the folder by a single run, written once by a sweep's driver and
opened by its trials without reading the folder again, and loaders that replay (seed, epoch)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import skinclr.data.manifest
import skinclr.data.inputs
from skinclr.config import ConfigError, load_config
from skinclr.data.manifest import read_manifest
from skinclr.data.problems import DataError
from skinclr.data.split import label_subset, split_by_lesion
from skinclr.data.inputs import load_inputs, make_loader, open_inputs, resolve_inputs, save_inputs
from skinclr.names import INPUTS_FILE


def config(root, stage="pretrain", **values):
    return load_config(None, {"data.root": str(root), "data.image_size": 16, "data.workers": 0, **values}, stage=stage)


@pytest.fixture
def driver(synth_dir, tmp_path):
    """What a sweep's driver leaves in its folder: the split file and the resolved-inputs file."""
    inputs = resolve_inputs(config(synth_dir), progress=False)
    split_file = save_inputs(inputs, tmp_path / "sweep")
    return inputs, split_file, tmp_path / "sweep" / INPUTS_FILE


@pytest.fixture
def no_folder_reads(monkeypatch):
    """Any scan of a dataset folder from here on fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dataset folder was read again")

    monkeypatch.setattr(skinclr.data.inputs, "read_manifest", refuse)
    monkeypatch.setattr(skinclr.data.manifest, "_scan", refuse)


def test_a_trial_opens_what_the_driver_resolved_without_reading_the_folder(synth_dir, driver, no_folder_reads):
    resolved, split_file, path = driver
    cfg = config(synth_dir, **{"data.split_file": str(split_file)})
    opened = open_inputs(cfg, path)
    pd.testing.assert_frame_equal(opened.manifest.frame, resolved.manifest.frame)
    pd.testing.assert_frame_equal(opened.split, resolved.split)
    assert (opened.manifest.root, opened.manifest.layout, opened.manifest.fingerprint) == (
        resolved.manifest.root, resolved.manifest.layout, resolved.manifest.fingerprint)
    assert np.array_equal(opened.train_rows, resolved.train_rows) and np.array_equal(opened.val_rows, resolved.val_rows)
    assert opened.tags() == resolved.tags()
    assert opened.cache.path == resolved.cache.path  # the driver's decode, found by its key
    doc = json.loads(path.read_text())
    assert doc["cache"] == {"dir": str(resolved.cache.path.parent), "key": resolved.cache.key}
    assert doc["split"]["fingerprint"] == resolved.split_fingerprint
    assert pd.read_csv(split_file)["image"].tolist() == resolved.split["image"].tolist()


def test_a_trial_that_varies_the_split_splits_the_stored_manifest(synth_dir, driver, no_folder_reads):
    _, _, path = driver
    opened = open_inputs(config(synth_dir, **{"data.folds": 3, "data.fold": 1}), path)
    assert opened.split["split"].tolist() != json.loads(path.read_text())["split"]["part"]
    assert opened.tags()["split_fingerprint"] != driver[0].split_fingerprint


def test_a_varied_split_equals_the_split_of_a_fresh_scan(synth_dir, driver):
    _, _, path = driver
    cfg = config(synth_dir, **{"data.folds": 3, "data.fold": 1})
    expected = split_by_lesion(read_manifest(synth_dir), folds=3, fold=1)
    pd.testing.assert_frame_equal(open_inputs(cfg, path).split, expected)


def test_each_trial_draws_its_labelled_subset_from_the_stored_split(synth_dir, driver, no_folder_reads):
    resolved, split_file, path = driver
    cfg = config(synth_dir, stage="finetune", **{"data.split_file": str(split_file), "data.label_fraction": 0.5,
                                                  "train.seed": 3})
    opened = open_inputs(cfg, path)
    expected = label_subset(resolved.split, 0.5, seed=3)
    assert opened.split["labelled"].tolist() == expected["labelled"].tolist()
    assert len(opened.train_rows) == int(((expected["split"] == "train") & expected["labelled"]).sum())
    assert len(opened.train_rows) < len(resolved.train_rows)
    assert np.array_equal(opened.val_rows, resolved.val_rows)  # val stays whole


def test_a_node_without_the_cache_decodes_it_from_the_manifest(synth_dir, driver, tmp_path, no_folder_reads):
    resolved, split_file, path = driver
    cfg = config(synth_dir, **{"data.split_file": str(split_file), "data.cache_dir": str(tmp_path / "node-cache")})
    opened = open_inputs(cfg, path)
    assert opened.cache.path.parent == tmp_path / "node-cache"
    assert opened.cache.key == resolved.cache.key
    assert np.array_equal(np.asarray(opened.cache.images), np.asarray(resolved.cache.images))


def test_a_trial_on_other_data_resolves_its_own(synth_dir, driver, tmp_path):
    from skinclr.data.synth import make_synthetic

    other = make_synthetic(tmp_path / "other", n=60, seed=5)
    opened = open_inputs(config(other, **{"data.val_fraction": 0.5, "data.min_per_class": 0}), driver[2])
    assert opened.manifest.root == other.resolve() and len(opened.manifest.frame) == 60


def test_a_file_that_does_not_hold_together_is_refused(synth_dir, driver):
    _, split_file, path = driver
    cfg = config(synth_dir, **{"data.split_file": str(split_file)})
    doc = json.loads(path.read_text())
    doc["split"]["part"][0] = "val" if doc["split"]["part"][0] == "train" else "train"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="does not match its fingerprint"):
        open_inputs(cfg, path)
    path.write_text(json.dumps({**doc, "version": 0}))
    with pytest.raises(DataError, match="version 0"):
        open_inputs(cfg, path)


def test_without_a_resolved_file_a_run_reads_the_folder_and_shares_its_split(synth_dir, tmp_path):
    split_file = tmp_path / "shared" / "split.csv"
    first = load_inputs(config(synth_dir, **{"data.split_file": str(split_file)}), None, progress=False)
    assert split_file.is_file()  # the first run writes the split the later ones share
    again = load_inputs(config(synth_dir, **{"data.split_file": str(split_file), "data.split_seed": 7}), None,
                        progress=False)
    assert again.split_fingerprint == first.split_fingerprint  # the file wins over the seed
    with pytest.raises(ConfigError, match="data.root"):
        resolve_inputs(config(""), progress=False)


def test_a_loader_replays_the_same_batches_for_the_same_seed_and_epoch(synth_dir):
    inputs = resolve_inputs(config(synth_dir), progress=False)

    def batches(seed, epoch):
        loader = make_loader(inputs.cache, inputs.train_rows, None, batch_size=8, seed=seed, epoch=epoch, shuffle=True)
        return [labels.tolist() for _, labels in loader][:5], next(iter(loader))[0]

    (order, first), (again, first_again) = batches(0, 2), batches(0, 2)
    assert order == again and np.array_equal(first, first_again)
    assert batches(0, 3)[0] != order and batches(1, 2)[0] != order


def test_a_split_file_that_is_a_folder_is_one_line(synth_dir, tmp_path):
    with pytest.raises(DataError, match="is a folder, not a split file"):
        resolve_inputs(config(synth_dir, **{"data.split_file": str(tmp_path)}), progress=False)
