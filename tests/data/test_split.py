"""Lesion-grouped splits of the real data and of small folders, folds, label fractions, split files,
and splits that cannot measure balanced accuracy."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from skinclr.data.manifest import check_folder, read_manifest
from skinclr.data.manifest import TRAINING_GT
from skinclr.names import CLASSES
from skinclr.data.problems import DataError
from skinclr.data.split import (check_split, label_fingerprint, label_subset, load_split, remembered_split,
                                save_split, split_by_lesion, split_fingerprint)
from tests.data.test_manifest import make_training, one_hot, set_line


@pytest.fixture(scope="module")
def real_manifest(real_data_dir):
    return read_manifest(real_data_dir)


@pytest.mark.real_data
def test_real_split_keeps_lesions_together_and_class_proportions(real_manifest):
    split = split_by_lesion(real_manifest, val_fraction=0.15, seed=0)
    train, val = split[split["split"] == "train"], split[split["split"] == "val"]
    assert not set(train["lesion_id"]) & set(val["lesion_id"])
    assert 0.12 < len(val) / len(split) < 0.18
    whole = np.bincount(split["label"], minlength=7) / len(split)
    for part in (train, val):
        share = np.bincount(part["label"], minlength=7) / len(part)
        assert np.abs(share - whole).max() < 0.02


@pytest.mark.real_data
def test_real_split_is_deterministic_per_seed(real_manifest):
    a = split_fingerprint(split_by_lesion(real_manifest, seed=0))
    assert a == split_fingerprint(split_by_lesion(real_manifest, seed=0))
    assert a != split_fingerprint(split_by_lesion(real_manifest, seed=1))


@pytest.mark.parametrize("params", [{}, {"seed": 2, "val_fraction": 0.25}, {"folds": 3, "fold": 2, "test_fraction": 0.2}])
def test_a_remembered_split_is_the_split_drawn_and_a_repeat_skips_scikit_learn(synth_dir, tmp_path, params):
    m = read_manifest(synth_dir)
    drawn = split_by_lesion(m, **params)
    first = remembered_split(m, tmp_path / "splits", **params)
    again = remembered_split(m, tmp_path / "splits", **params)
    for split in (first, again):
        assert split["split"].tolist() == drawn["split"].tolist()
        assert split.drop(columns="split").equals(m.frame)
    probe = ("import sys; from skinclr.data.manifest import read_manifest; from skinclr.data.split import remembered_split; "
             f"remembered_split(read_manifest({str(synth_dir)!r}), {str(tmp_path / 'splits')!r}, **{params!r}); "
             "print('sklearn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_remembered_split_follows_the_lesions_and_survives_an_unwritable_folder(synth_dir, tmp_path):
    m = read_manifest(synth_dir)
    remembered_split(m, tmp_path / "splits")
    regrouped = m.frame.copy()
    regrouped["lesion_id"] = "HAM_" + regrouped["image"]  # every image its own lesion: another split
    m2 = type(m)(regrouped, m.root, m.layout, m.warnings, m.fingerprint)  # same files, same fingerprint
    assert remembered_split(m2, tmp_path / "splits")["split"].tolist() == split_by_lesion(m2)["split"].tolist()
    assert len(list((tmp_path / "splits").glob("split-*.npy"))) == 2
    for damage in (b"", b"not numpy", None):  # a damaged file is drawn again, never trusted
        path = next((tmp_path / "splits").glob("split-*.npy"))
        if damage is None:
            np.save(path, np.full(len(m.frame), 7, dtype=np.int8))
        else:
            path.write_bytes(damage)
        for f in (tmp_path / "splits").glob("split-*.npy"):
            if f != path:
                f.unlink()
        assert remembered_split(m, tmp_path / "splits")["split"].tolist() == split_by_lesion(m)["split"].tolist()
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert remembered_split(m, blocked / "splits")["split"].tolist() == split_by_lesion(m)["split"].tolist()


def test_split_round_trips_through_csv(synth_dir, tmp_path):
    m = read_manifest(synth_dir)
    split = split_by_lesion(m, val_fraction=0.2, seed=3)
    loaded = load_split(save_split(split, tmp_path / "split.csv"), m)
    assert split_fingerprint(loaded) == split_fingerprint(split)
    assert loaded["split"].tolist() == split["split"].tolist()
    assert set(pd.read_csv(tmp_path / "split.csv")["label"]) <= set(CLASSES)


def test_split_of_other_data_is_refused(synth_dir, tmp_path):
    m = read_manifest(synth_dir)
    path = save_split(split_by_lesion(m), tmp_path / "split.csv")
    set_line(path, 2, "ISIC_0099999,NV,HAM_0000001,train")
    with pytest.raises(DataError) as err:
        load_split(path, m)
    assert any("ISIC_0099999" in p and "line 2" in p for p in err.value.problems)
    assert any("not in the split" in p for p in err.value.problems)  # the image that line held


def test_split_with_a_lesion_on_both_sides_is_refused(synth_dir, tmp_path):
    m = read_manifest(synth_dir)
    split = split_by_lesion(m)
    lesion = split["lesion_id"].value_counts().index[0]  # one with several images
    rows = split.index[split["lesion_id"] == lesion]
    split.loc[rows, "split"] = ["train", "val"] + ["train"] * (len(rows) - 2)
    with pytest.raises(DataError, match=lesion):
        load_split(save_split(split, tmp_path / "split.csv"), m)


def lesions(frame: pd.DataFrame) -> set:
    return set(frame["lesion_id"])


@pytest.mark.real_data
def test_real_folds_are_disjoint_lesion_groups_that_cover_every_image(real_manifest):
    folds = [split_by_lesion(real_manifest, seed=0, folds=5, fold=i) for i in range(5)]
    vals = [f.loc[f["split"] == "val", "image"] for f in folds]
    assert sum(len(v) for v in vals) == len(real_manifest.frame)  # each image is val exactly once
    assert set().union(*map(set, vals)) == set(real_manifest.frame["image"])
    for f in folds:
        assert not lesions(f[f["split"] == "train"]) & lesions(f[f["split"] == "val"])
        assert 0.17 < (f["split"] == "val").mean() < 0.23
        check_split(f)  # every class on both sides
    # fold 0 of round(1 / 0.15) = 7 folds is the default split
    assert split_fingerprint(split_by_lesion(real_manifest, seed=0, folds=7, fold=0)) == \
        split_fingerprint(split_by_lesion(real_manifest, val_fraction=0.15, seed=0))


@pytest.mark.real_data
def test_real_label_fraction_is_lesion_grouped_stratified_and_leaves_val_alone(real_manifest):
    split = split_by_lesion(real_manifest, seed=0)
    train = split[split["split"] == "train"]
    sub = label_subset(split, 0.05, seed=0)
    labelled = sub[(sub["split"] == "train") & sub["labelled"]]
    assert (sub.loc[sub["split"] == "val", "labelled"]).all()
    assert sub["split"].tolist() == split["split"].tolist() and split_fingerprint(sub) == split_fingerprint(split)
    # whole lesions only: a labelled lesion has all its train images labelled
    assert set(train.loc[train["lesion_id"].isin(lesions(labelled)), "image"]) == set(labelled["image"])
    per_class = np.bincount(labelled["label"], minlength=7)
    whole = np.bincount(train["label"], minlength=7)
    assert (per_class >= 1).all()  # DF has 100 train images: 5 of them, in at least one lesion
    assert np.all(np.abs(per_class - 0.05 * whole) <= 6)  # over by less than one lesion's images
    assert 0.045 < len(labelled) / len(train) < 0.06


def test_label_fraction_is_deterministic_nested_and_seeded(synth_dir):
    split = split_by_lesion(read_manifest(synth_dir), seed=0)

    def chosen(fraction, seed):
        sub = label_subset(split, fraction, seed)
        return set(sub.loc[(sub["split"] == "train") & sub["labelled"], "image"])

    assert chosen(0.25, 0) == chosen(0.25, 0)
    assert chosen(0.1, 0) < chosen(0.25, 0) < chosen(0.5, 0) < chosen(1.0, 0)  # nested for one seed
    assert chosen(0.25, 0) != chosen(0.25, 1)
    assert chosen(1.0, 3) == set(split.loc[split["split"] == "train", "image"])
    sub = label_subset(split, 0.01, seed=0)  # tiny: still one lesion of every class
    assert set(sub.loc[(sub["split"] == "train") & sub["labelled"], "label"]) == set(range(7))
    assert label_fingerprint(label_subset(split, 0.25, 0)) != label_fingerprint(label_subset(split, 0.25, 1))


def test_fold_out_of_range_and_too_many_folds_are_refused(synth_dir):
    m = read_manifest(synth_dir)
    with pytest.raises(DataError, match="folds are numbered 0..4"):
        split_by_lesion(m, folds=5, fold=5)
    with pytest.raises(DataError, match="too few for 1000 folds"):
        split_by_lesion(m, folds=1000)


def test_split_missing_a_class_on_one_side_names_the_class(tmp_path):
    from skinclr.data.synth import make_synthetic

    root = make_synthetic(tmp_path / "s", n=60, seed=0)  # 60 images: a 15% val side lacks some classes
    split = split_by_lesion(read_manifest(root), val_fraction=0.15, seed=0)
    with pytest.raises(DataError) as err:
        check_split(split)
    [line] = err.value.problems
    absent = [c for i, c in enumerate(CLASSES) if not ((split["split"] == "val") & (split["label"] == i)).any()]
    assert absent and all(f"{c} has" in line for c in absent)
    assert "data.min_per_class" in line and "data.val_fraction" in line
    assert check_split(split, min_per_class=0) == []  # accepted on request: nothing absent from the data


def test_split_minimum_per_class_is_configurable(tmp_path):
    root = make_training(tmp_path / "d", n=63)  # 9 images a class (4 two-image lesions, 1 single): val gets 1-2
    split = split_by_lesion(read_manifest(root), val_fraction=0.2, seed=0)
    assert check_split(split) == []
    single = [c for i, c in enumerate(CLASSES) if ((split["split"] == "val") & (split["label"] == i)).sum() == 1]
    with pytest.raises(DataError) as err:
        check_split(split, min_per_class=2)
    assert single and all(f"{c} has" in err.value.problems[0] for c in single)


def test_missing_class_warns_in_check_and_is_reported_by_the_split(tmp_path):
    root = make_training(tmp_path / "d", n=42)
    gt = root / TRAINING_GT
    lines = gt.read_text().splitlines()
    gt.write_text("\n".join([lines[0]] + [ln.replace(one_hot("DF"), one_hot("NV")) for ln in lines[1:]]) + "\n")
    manifest, problems, warnings = check_folder(root, progress=False)
    assert problems == [] and len(warnings) == 1 and "no images of class DF" in warnings[0]
    split = split_by_lesion(manifest, val_fraction=0.5, seed=0)
    with pytest.raises(DataError, match="DF has 0 train / 0 val"):
        check_split(split)
    assert check_split(split, min_per_class=0) == ["DF"]


def test_split_of_a_handful_of_images_is_one_clear_error(tmp_path):
    root = make_training(tmp_path / "d", n=14)  # 2 images a class, fewer than 7 folds
    with pytest.raises(DataError, match="every class has fewer images than the 7 folds"):
        split_by_lesion(read_manifest(root), val_fraction=0.15, seed=0)


@pytest.mark.real_data
def test_a_test_split_is_held_out_first_and_every_other_draw_lives_in_the_rest(real_manifest, tmp_path):
    """One test side per (test_fraction, test_seed): disjoint by lesion from train and val under
    every split seed and fold, untouched by label subsets, class-stratified, with its own fingerprint;
    and test_fraction 0 draws today's split exactly."""
    from skinclr.data.split import test_fingerprint

    assert split_fingerprint(split_by_lesion(real_manifest, seed=2, test_fraction=0.0)) == \
        split_fingerprint(split_by_lesion(real_manifest, seed=2))
    splits = [split_by_lesion(real_manifest, val_fraction=0.15, seed=s, test_fraction=0.2) for s in (0, 1)]
    splits += [split_by_lesion(real_manifest, seed=0, folds=5, fold=f, test_fraction=0.2) for f in (0, 4)]
    tests = {test_fingerprint(s) for s in splits}
    assert len(tests) == 1 and "" not in tests
    test = splits[0][splits[0]["split"] == "test"]
    assert 0.17 < len(test) / len(real_manifest.frame) < 0.23
    whole = np.bincount(real_manifest.frame["label"], minlength=7) / len(real_manifest.frame)
    assert np.abs(np.bincount(test["label"], minlength=7) / len(test) - whole).max() < 0.02
    for split in splits:
        test_lesions = set(split.loc[split["split"] == "test", "lesion_id"])
        assert not test_lesions & set(split.loc[split["split"] != "test", "lesion_id"])
        subset = label_subset(split, 0.1, seed=3)
        assert not subset.loc[subset["split"] == "test", "labelled"].any()
    assert len({split_fingerprint(s) for s in splits}) == 4  # the train/val draws still differ
    assert test_fingerprint(split_by_lesion(real_manifest, test_fraction=0.2, test_seed=1)) not in tests
    loaded = load_split(save_split(splits[0], tmp_path / "split.csv"), real_manifest)
    assert test_fingerprint(loaded) == test_fingerprint(splits[0])
    assert check_split(splits[0]) == []


def test_a_split_file_whose_test_side_shares_a_lesion_is_refused(synth_dir, tmp_path):
    m = read_manifest(synth_dir)
    split = split_by_lesion(m, val_fraction=0.2, seed=0, test_fraction=0.2)
    test = split[split["split"] == "test"]
    lesion = test["lesion_id"].value_counts().idxmax()  # a lesion photographed more than once
    assert (test["lesion_id"] == lesion).sum() >= 2
    split.loc[test.index[test["lesion_id"] == lesion][0], "split"] = "val"
    with pytest.raises(DataError, match=r"have images in both val and test"):
        load_split(save_split(split, tmp_path / "split.csv"), m)
