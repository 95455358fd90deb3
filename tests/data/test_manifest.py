"""Reading dataset folders: the real ISIC 2018 data, every layout, every kind of broken folder."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinclr.data.manifest import check_folder, read_manifest, summary_table
from skinclr.data.images import load_rgb
from skinclr.data.manifest import GROUPINGS, HAM_METADATA, TRAINING_GT, TRAINING_INPUT
from skinclr.names import CLASSES
from skinclr.data.problems import MAX_LINES, DataError

REAL_COUNTS = {"MEL": 1113, "NV": 6705, "BCC": 514, "AKIEC": 327, "BKL": 1099, "DF": 115, "VASC": 142}


def one_hot(label: str) -> str:
    return ",".join("1.0" if c == label else "0.0" for c in CLASSES)


def write_jpeg(path, seed: int = 0, size=(40, 30)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_training(root, n: int = 8):
    """A tiny official-layout training folder: ISIC_0000000.. cycling through the classes; images k
    and k+7 are one lesion (of one class, as a lesion has one diagnosis)."""
    (root / TRAINING_INPUT).mkdir(parents=True)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    for k, image in enumerate(ids):
        write_jpeg(root / TRAINING_INPUT / f"{image}.jpg", seed=k)
    (root / TRAINING_GT).write_text("\n".join(["image," + ",".join(CLASSES)] +
                                              [f"{i},{one_hot(CLASSES[k % 7])}" for k, i in enumerate(ids)]) + "\n")
    (root / GROUPINGS).write_text("\n".join(["image,lesion_id,diagnosis_confirm_type"] +
                                            [f"{i},HAM_{k % 7 + 7 * (k // 14):07d},histopathology" for k, i in enumerate(ids)]) + "\n")
    return root


def set_line(path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def problems_of(root) -> list[str]:
    with pytest.raises(DataError) as err:
        read_manifest(root)
    assert str(err.value) == "\n".join(err.value.problems)
    return err.value.problems


# --- the real data ---------------------------------------------------------------------------

@pytest.mark.real_data
def test_real_folder_decodes_without_problems(real_data_dir):
    manifest, problems, warnings = check_folder(real_data_dir, progress=False)
    assert problems == [] and warnings == []
    assert manifest.layout == "isic2018-training"  # the official files win over HAM10000_metadata.csv
    assert len(manifest.frame) == 10_015
    assert manifest.class_counts() == REAL_COUNTS
    assert manifest.lesion_count() == 7_470
    table = summary_table(manifest)
    assert "10,015" in table and "7,470" in table and "6,705" in table


# --- a good small folder ---------------------------------------------------------------------

def test_small_folder_reads_into_manifest(tmp_path):
    root = make_training(tmp_path / "isic")
    m = read_manifest(root)
    assert m.layout == "isic2018-training" and m.warnings == []
    assert list(m.frame.columns) == ["image", "path", "label", "lesion_id"]
    assert m.frame["image"].tolist() == [f"ISIC_{i:07d}" for i in range(8)]
    assert m.frame["label"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert m.frame.loc[3, "lesion_id"] == "HAM_0000003" and m.frame.loc[7, "lesion_id"] == "HAM_0000000"
    assert m.frame.loc[3, "path"] == str((root / TRAINING_INPUT / "ISIC_0000003.jpg").resolve())
    assert m.lesion_count() == 7


def test_fingerprint_follows_labels(tmp_path):
    root = make_training(tmp_path / "isic")
    before = read_manifest(root).fingerprint
    assert read_manifest(root).fingerprint == before
    set_line(root / TRAINING_GT, 3, f"ISIC_0000001,{one_hot('DF')}")
    assert read_manifest(root).fingerprint != before


def test_rewritten_image_of_the_same_size_changes_the_fingerprint(tmp_path):
    root = make_training(tmp_path / "d", n=8)
    before = read_manifest(root).fingerprint
    path = root / TRAINING_INPUT / "ISIC_0000003.jpg"
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # other bytes, same length
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    import os
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a later write
    assert read_manifest(root).fingerprint != before


# --- one test per kind of problem ------------------------------------------------------------

def test_row_without_positive(tmp_path):
    root = make_training(tmp_path / "isic")
    set_line(root / TRAINING_GT, 3, "ISIC_0000001," + ",".join(["0.0"] * 7))
    [line] = problems_of(root)
    assert f"{TRAINING_GT} line 3 (ISIC_0000001)" in line and "no class" in line


def test_row_with_several_positives(tmp_path):
    root = make_training(tmp_path / "isic")
    set_line(root / TRAINING_GT, 4, "ISIC_0000002,1.0,1.0,0.0,0.0,0.0,0.0,1.0")
    [line] = problems_of(root)
    assert f"{TRAINING_GT} line 4 (ISIC_0000002)" in line and "3 classes" in line


def test_value_that_is_not_a_number(tmp_path):
    root = make_training(tmp_path / "isic")
    set_line(root / TRAINING_GT, 2, "ISIC_0000000,yes,0.0,0.0,0.0,0.0,0.0,0.0")
    [line] = problems_of(root)
    assert f"{TRAINING_GT} line 2 (ISIC_0000000), column MEL" in line and "'yes' is not a number" in line


def test_missing_and_unknown_columns(tmp_path):
    root = make_training(tmp_path / "isic")
    gt = root / TRAINING_GT
    gt.write_text(gt.read_text().replace("VASC", "SCC", 1))
    problems = problems_of(root)
    assert any("column 'VASC' is missing" in p for p in problems)
    assert any("unknown column 'SCC'" in p for p in problems)
    assert all(TRAINING_GT in p for p in problems)


def test_duplicate_ids(tmp_path):
    root = make_training(tmp_path / "isic")
    set_line(root / TRAINING_GT, 5, f"ISIC_0000001,{one_hot('NV')}")
    problems = problems_of(root)
    assert any(TRAINING_GT in p and "ISIC_0000001 appears on lines 3, 5" in p for p in problems)


def test_listed_image_that_is_missing(tmp_path):
    root = make_training(tmp_path / "isic")
    (root / TRAINING_INPUT / "ISIC_0000005.jpg").unlink()
    [line] = problems_of(root)
    assert "ISIC_0000005" in line and "not found" in line and "line 7" in line


def test_groupings_naming_an_image_the_ground_truth_lacks(tmp_path):
    root = make_training(tmp_path / "isic")
    with open(root / GROUPINGS, "a") as f:
        f.write("ISIC_0099999,HAM_0000009,histopathology\n")
    [line] = problems_of(root)
    assert GROUPINGS in line and "ISIC_0099999" in line and "line 10" in line


def test_image_missing_from_groupings_is_a_warning(tmp_path):
    root = make_training(tmp_path / "isic")
    set_line(root / GROUPINGS, 4, "")  # drops ISIC_0000002
    m = read_manifest(root)
    assert pd.isna(m.frame.loc[2, "lesion_id"])
    [warning] = m.warnings
    assert GROUPINGS in warning and "ISIC_0000002" in warning


def test_every_problem_is_reported_at_once(tmp_path):
    root = make_training(tmp_path / "isic")
    set_line(root / TRAINING_GT, 3, "ISIC_0000001," + ",".join(["0.0"] * 7))
    (root / TRAINING_INPUT / "ISIC_0000005.jpg").unlink()
    (root / TRAINING_INPUT / "ISIC_0000006.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        read_manifest(root, decode=True)
    text = str(err.value)
    assert len(err.value.problems) == 3
    assert "ISIC_0000001" in text and "ISIC_0000005" in text and "ISIC_0000006.jpg: file is empty" in text


def test_problem_lines_are_capped_per_kind(tmp_path):
    root = make_training(tmp_path / "isic", n=40)
    for k in range(8, 40):
        (root / TRAINING_INPUT / f"ISIC_{k:07d}.jpg").unlink()
    problems = problems_of(root)
    assert len(problems) == MAX_LINES + 1
    assert problems[-1] == f"... and {32 - MAX_LINES} more missing images"


def test_path_that_does_not_exist(tmp_path):
    [line] = problems_of(tmp_path / "nowhere")
    assert "nowhere" in line and "does not exist" in line


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    [line] = problems_of(tmp_path / "data.zip")
    assert "data.zip" in line and "not a folder" in line


def test_empty_folder(tmp_path):
    (tmp_path / "isic").mkdir()
    [line] = problems_of(tmp_path / "isic")
    assert "it is empty" in line and TRAINING_GT in line


def test_missing_ground_truth_file(tmp_path):
    root = make_training(tmp_path / "isic")
    (root / TRAINING_GT).unlink()
    (root / GROUPINGS).unlink()
    [line] = problems_of(root)
    assert TRAINING_INPUT in line and f"no {TRAINING_GT}" in line


def test_image_folder_without_images(tmp_path):
    root = make_training(tmp_path / "isic")
    for p in (root / TRAINING_INPUT).iterdir():
        p.unlink()
    [line] = problems_of(root)
    assert TRAINING_INPUT in line and "holds no images" in line


def test_empty_corrupt_and_truncated_images(tmp_path):
    root = make_training(tmp_path / "isic")
    folder = root / TRAINING_INPUT
    (folder / "ISIC_0000001.jpg").write_bytes(b"")
    (folder / "ISIC_0000002.jpg").write_bytes(b"this is not a JPEG at all")
    write_jpeg(folder / "ISIC_0000003.jpg", size=(200, 150))
    data = (folder / "ISIC_0000003.jpg").read_bytes()
    (folder / "ISIC_0000003.jpg").write_bytes(data[: len(data) // 2])

    assert read_manifest(root).layout == "isic2018-training"  # structure alone is fine
    manifest, problems, _ = check_folder(root, progress=False)
    assert manifest is None
    assert problems[0].startswith(f"{TRAINING_INPUT}/ISIC_0000001.jpg: file is empty")
    assert problems[1].startswith(f"{TRAINING_INPUT}/ISIC_0000002.jpg: not a readable image")
    assert problems[2].startswith(f"{TRAINING_INPUT}/ISIC_0000003.jpg: image is truncated")
    for name in ("ISIC_0000001.jpg", "ISIC_0000002.jpg", "ISIC_0000003.jpg"):
        with pytest.raises(DataError, match=name):
            load_rgb(folder / name)


def test_unlisted_images_warn_and_text_files_are_ignored(tmp_path):
    root = make_training(tmp_path / "isic")
    write_jpeg(root / TRAINING_INPUT / "ISIC_0099999.jpg")
    (root / TRAINING_INPUT / "LICENSE.txt").write_text("CC BY-NC 4.0")
    (root / TRAINING_INPUT / "ATTRIBUTION.txt").write_text("HAM10000")
    manifest, problems, warnings = check_folder(root, progress=False)
    assert problems == [] and len(manifest.frame) == 8
    [warning] = warnings
    assert "ISIC_0099999.jpg" in warning and "LICENSE" not in warning and "ATTRIBUTION" not in warning


def test_several_splits_in_one_folder(tmp_path):
    root = make_training(tmp_path / "isic")
    (root / "ISIC2018_Task3_Test_GroundTruth.csv").write_text((root / TRAINING_GT).read_text())
    [line] = problems_of(root)
    assert "ISIC2018_Task3_Test_GroundTruth.csv" in line and "own folder" in line


# --- other layouts ---------------------------------------------------------------------------

def test_validation_layout(tmp_path):
    root = tmp_path / "val"
    (root / "ISIC2018_Task3_Validation_Input").mkdir(parents=True)
    for k in range(3):
        write_jpeg(root / "ISIC2018_Task3_Validation_Input" / f"ISIC_{k:07d}.jpg", seed=k)
    (root / "ISIC2018_Task3_Validation_GroundTruth.csv").write_text(
        "image," + ",".join(CLASSES) + "\n" + "".join(f"ISIC_{k:07d},{one_hot(CLASSES[k])}\n" for k in range(3)))
    m = read_manifest(root)
    assert m.layout == "isic2018-validation" and m.frame["label"].tolist() == [0, 1, 2]
    assert m.frame["lesion_id"].isna().all() and m.lesion_count() is None
    assert "n/a" in summary_table(m)


def test_test_layout_with_images_beside_the_ground_truth(tmp_path):
    root = tmp_path / "test"
    root.mkdir()
    for k in range(3):
        write_jpeg(root / f"ISIC_{k:07d}.jpg", seed=k)
    (root / "ISIC2018_Task3_Test_GroundTruth.csv").write_text(
        "image," + ",".join(CLASSES) + "\n" + "".join(f"ISIC_{k:07d},{one_hot('BKL')}\n" for k in range(3)))
    m = read_manifest(root)
    assert m.layout == "isic2018-test" and m.class_counts()["BKL"] == 3


def test_ham10000_layout(tmp_path):
    root = tmp_path / "ham"
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        (root / part).mkdir(parents=True)
    rows = [("HAM_0000001", "ISIC_0000000", "mel", 1), ("HAM_0000001", "ISIC_0000001", "mel", 2),
            ("HAM_0000002", "ISIC_0000002", "vasc", 2)]
    for _, image, _, part in rows:
        write_jpeg(root / f"HAM10000_images_part_{part}" / f"{image}.jpg")
    body = "".join(f"{lesion},{image},{dx},histo,50.0,male,back\n" for lesion, image, dx, _ in rows)
    (root / HAM_METADATA).write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + body)
    m = read_manifest(root)
    assert m.layout == "ham10000"
    assert m.frame["label"].tolist() == [0, 0, 6]
    assert m.frame["lesion_id"].tolist() == ["HAM_0000001", "HAM_0000001", "HAM_0000002"]

    set_line(root / HAM_METADATA, 4, "HAM_0000002,ISIC_0000002,scc,histo,50.0,male,back")
    [line] = problems_of(root)
    assert HAM_METADATA in line and "line 4" in line and "'scc'" in line


@pytest.mark.parametrize("layout", ["isic", "ham"])
def test_a_ground_truth_with_a_header_and_no_rows_is_an_error_naming_it(tmp_path, layout):
    """Zero images is no dataset: `data check` and `evaluate` both refuse it at the file, and the
    groupings file (which then names unknown images) is not blamed."""
    root = make_training(tmp_path / "isic")
    if layout == "isic":
        gt = root / TRAINING_GT
        gt.write_text("image," + ",".join(CLASSES) + "\n")
    else:
        (root / TRAINING_GT).unlink()
        gt = root / HAM_METADATA
        gt.write_text("lesion_id,image_id,dx\n")
    [line] = problems_of(root)
    assert str(gt) in line and "no rows" in line and GROUPINGS not in line
    manifest, problems, _ = check_folder(root, progress=False)
    assert manifest is None and problems == [line]


def test_images_that_are_no_lesion_picture_are_named_one_line_each(tmp_path):
    """`data check` decodes every file: a 1x1 image, a 3000x2 sliver and a fully transparent PNG
    decode, but are no lesion picture; each gets a warning naming it, the folder still checks."""
    root = make_training(tmp_path / "isic", n=10)
    folder = root / TRAINING_INPUT
    Image.new("RGB", (1, 1), (90, 60, 40)).save(folder / "ISIC_0000001.jpg")
    Image.new("RGB", (3000, 2), (90, 60, 40)).save(folder / "ISIC_0000002.jpg")
    (folder / "ISIC_0000003.jpg").unlink()
    Image.new("RGBA", (40, 30), (200, 100, 50, 0)).save(folder / "ISIC_0000003.png")
    manifest, problems, warnings = check_folder(root, progress=False)
    assert problems == [] and manifest is not None
    doubts = {line.split(":")[0]: line for line in warnings if "ISIC_000000" in line}
    assert set(doubts) == {f"{TRAINING_INPUT}/ISIC_000000{i}.{ext}" for i, ext in ((1, "jpg"), (2, "jpg"), (3, "png"))}
    assert "1x1" in doubts[f"{TRAINING_INPUT}/ISIC_0000001.jpg"]
    assert "2x2" in doubts[f"{TRAINING_INPUT}/ISIC_0000002.jpg"]
    assert "transparent" in doubts[f"{TRAINING_INPUT}/ISIC_0000003.png"]


def test_a_lesion_with_images_of_different_diagnoses_is_named(tmp_path):
    root = make_training(tmp_path / "isic", n=8)
    set_line(root / GROUPINGS, 3, "ISIC_0000001,HAM_0000000,histopathology")  # NV, into MEL's lesion
    _, problems, warnings = check_folder(root, progress=False)
    [line] = [w for w in warnings if "HAM_0000000" in w]
    assert problems == [] and "ISIC_0000000 MEL" in line and "ISIC_0000001 NV" in line


def test_an_image_id_holding_a_line_break_is_refused(tmp_path):
    root = make_training(tmp_path / "isic")
    gt = root / TRAINING_GT
    gt.write_text(gt.read_text().replace("ISIC_0000003,", '"ISIC_00\n00003",', 1))
    lines = [p for p in problems_of(root) if "line break" in p]
    assert len(lines) == 1 and TRAINING_GT in lines[0] and "ISIC_00\\n00003" in lines[0]


def test_a_trailing_comma_on_every_row_is_named_as_one_field_too_many(tmp_path):
    root = make_training(tmp_path / "isic")
    gt = root / TRAINING_GT
    lines = gt.read_text().splitlines()
    gt.write_text("\n".join([lines[0]] + [line + "," for line in lines[1:]]) + "\n")
    [line] = problems_of(root)
    assert TRAINING_GT in line and "8 row(s) have more fields than the header's 8" in line
    assert "trailing comma" in line


def test_image_ids_written_with_their_extension_name_the_real_fix(tmp_path):
    root = make_training(tmp_path / "isic")
    gt = root / TRAINING_GT
    gt.write_text(gt.read_text().replace("ISIC_0000002,", "ISIC_0000002.jpg,"))
    lines = problems_of(root)
    assert "ISIC_0000002.jpg ends in a file extension" in lines[0] and "(ISIC_0000002)" in lines[0]
    assert not any(".jpg.jpg" in line for line in lines)
