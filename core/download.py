"""Download the official ISIC 2018 Task 3 archives into folders that `core.data` reads as they are.

Each file is fetched resumably and verified (core/fetch.py), then unpacked into its split's
folder (core/unpack.py); core/archives.py says what the files are and where each one lands.
Each split gets the official layout in its own folder, because a folder holds one split for
`core.data` (and for `skinclr evaluate --data DIR`):

    OUT/                   ISIC2018_Task3_Training_Input/, ISIC2018_Task3_Training_GroundTruth.csv,
                           ISIC2018_Task3_Training_LesionGroupings.csv
    OUT/validation/        ISIC2018_Task3_Validation_Input/, ISIC2018_Task3_Validation_GroundTruth.csv
    OUT/test/              ISIC2018_Task3_Test_Input/, ISIC2018_Task3_Test_GroundTruth.csv

A rerun touches the network only for what is missing, and each complete split is checked by
`core.data` before the command returns.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from core.archives import ARCHIVES, SPLITS, STAGING, Archive, DownloadError, installed, split_dir
from core.fetch import MIRROR_ENV, OFFICIAL_URL, fetch, file_digests, human_size, read_checksums
from core.unpack import install


def download_isic2018(out, parts: list[str] | None = None, base_url: str | None = None,
                      progress: bool = True, check: bool = True) -> Path:
    """Download, verify and unpack `parts` (archive names or split names; default: all) into OUT.

    `base_url` (else $SKINCLR_ISIC_MIRROR, else the official bucket) must serve the official
    file names. If it also serves SHA256SUMS, those checksums are verified (they take precedence
    over the published ones). With `check`, every complete split is validated by `core.data`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out}: is a file; pass a folder for --out")
    chosen = _select(parts)
    base = (base_url or os.environ.get(MIRROR_ENV) or OFFICIAL_URL).rstrip("/") + "/"
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)

    todo = [a for a in chosen if not installed(a, out)]
    for a in chosen:
        if a not in todo:
            print(f"{a.name}: already in {split_dir(out, a.split)}, skipped")
    if todo:
        print(f"downloading {len(todo)} file(s), about {human_size(sum(a.approx_bytes for a in todo))}, "
              f"from {base} into {out}")
    checksums = None  # fetched only when something has to be downloaded
    for a in todo:
        path = staging / a.name
        if path.is_file():  # verified by an earlier run that stopped before unpacking it
            print(f"{a.name}: verified in an earlier run")
            digests = file_digests(path, ["sha256"])
        else:
            if checksums is None:
                checksums = read_checksums(base)
            digests = fetch(a, base, path, checksums, progress)
        install(a, path, out, digests, base)
    if check:
        _check_splits(out, chosen, progress)
    return out


def _select(parts: list[str] | None) -> tuple[Archive, ...]:
    if not parts:
        return ARCHIVES
    names = {a.name for a in ARCHIVES}
    for p in parts:
        if p not in names and p not in SPLITS:
            raise DownloadError(f"unknown part '{p}'; choose splits ({', '.join(SPLITS)}) or archives "
                                f"({', '.join(a.name for a in ARCHIVES)})")
    return tuple(a for a in ARCHIVES if a.name in parts or a.split in parts)


def _check_splits(out: Path, chosen: tuple[Archive, ...], progress: bool) -> None:
    """Validate each split that now has its images and ground truth; print its summary."""
    from core.data import check_folder, summary_table

    for split in dict.fromkeys(a.split for a in chosen):
        folder = split_dir(out, split)
        missing = [a.name for a in ARCHIVES if a.split == split and a.kind != "groupings" and not installed(a, out)]
        if missing:
            print(f"{split}: not checked yet, {', '.join(missing)} still missing (add them with --parts)")
            continue
        manifest, problems, warnings = check_folder(folder, progress=progress)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if problems:
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            raise DownloadError(f"download finished but the data check of {folder} failed ({len(problems)} "
                                "problem(s) listed above): the files may not be the official ones; delete the "
                                "folder and rerun, or fix the files and run `skinclr data check`")
        print(summary_table(manifest))
