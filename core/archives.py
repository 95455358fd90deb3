"""The seven official ISIC 2018 Task 3 files: names, sizes, checksums, and where each one lands.

Each split gets the official layout in a folder of its own, because a folder holds one split for
`core.data` (and for `skinclr evaluate --data DIR`): the training split in OUT, the others in
OUT/validation and OUT/test. An installed file is remembered by a marker in OUT/.downloads/, so a
rerun touches the network only for what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("training", "validation", "test")
STAGING = ".downloads"  # in OUT: partial and verified files, and the markers of installed ones


class DownloadError(Exception):
    """A download that cannot go on; the message names the file and what to do."""


@dataclass(frozen=True)
class Archive:
    name: str
    split: str
    kind: str  # "images" (zip of a JPEG folder), "labels" (zip holding the ground-truth CSV), "groupings" (a CSV)
    approx_bytes: int  # size as rounded on the official data page; the exact size comes from the server
    md5: str | None = None  # a published checksum, where one exists

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


# Names and sizes: https://challenge.isic-archive.com/data/#2018 (template in github.com/ImageMarkup/stade,
# stade/core/templates/data/2018.html). ISIC publishes no checksums. The two MD5s are those the
# trojanzoo project checks its downloads of the same URLs against (github.com/ain-soph/trojanzoo,
# trojanvision/datasets/folder/isic.py); the other five files have no public checksum, so only
# their size (as the server reports it) is verified.
ARCHIVES = (
    Archive("ISIC2018_Task3_Training_Input.zip", "training", "images", 2_600_000_000,
            md5="0c281f121070a8d63457caffcdec439a"),
    Archive("ISIC2018_Task3_Training_GroundTruth.zip", "training", "labels", 36_000),
    Archive("ISIC2018_Task3_Training_LesionGroupings.csv", "training", "groupings", 481_000),
    Archive("ISIC2018_Task3_Validation_Input.zip", "validation", "images", 51_000_000,
            md5="c1fbdd4f5468b0d67c61a1b2def87077"),
    Archive("ISIC2018_Task3_Validation_GroundTruth.zip", "validation", "labels", 7_000),
    Archive("ISIC2018_Task3_Test_Input.zip", "test", "images", 401_000_000),
    Archive("ISIC2018_Task3_Test_GroundTruth.zip", "test", "labels", 16_000),
)


def split_dir(out: Path, split: str) -> Path:
    return out if split == "training" else out / split


def destinations(a: Archive, out: Path) -> list[Path]:
    """What installing an archive creates: its folder and, for ground truth, the CSV beside it."""
    folder = split_dir(out, a.split)
    if a.kind == "groupings":
        return [folder / a.name]
    if a.kind == "labels":
        return [folder / a.stem, folder / f"{a.stem}.csv"]
    return [folder / a.stem]


def marker(a: Archive, out: Path) -> Path:
    return out / STAGING / f"{a.name}.installed"


def installed(a: Archive, out: Path) -> bool:
    return marker(a, out).is_file() and all(t.exists() for t in destinations(a, out))
