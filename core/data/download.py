"""`skinclr data download`: the seven official ISIC 2018 Task 3 files fetched, verified, unpacked
into folders `skinclr.data.manifest` reads as they are, and checked.

Each split gets the official layout in a folder of its own, because a folder holds one split
(for `skinclr evaluate --data DIR` too):

    OUT/                   ISIC2018_Task3_Training_Input/, ISIC2018_Task3_Training_GroundTruth.csv,
                           ISIC2018_Task3_Training_LesionGroupings.csv
    OUT/validation/        ISIC2018_Task3_Validation_Input/, ISIC2018_Task3_Validation_GroundTruth.csv
    OUT/test/              ISIC2018_Task3_Test_Input/, ISIC2018_Task3_Test_GroundTruth.csv

The files and their transfers are core/data/fetch.py. An images archive becomes its split's
`*_Input/` folder and a ground-truth archive its CSV beside it (the archive's licence files stay
in a folder of their own); archives that escape their folder are refused. An unpacked archive is
deleted once its marker is written, and each complete split is checked before the command returns.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

from skinclr.data.fetch import (
    ARCHIVES,
    CHUNK,
    MIRROR_ENV,
    OFFICIAL_URL,
    SPLITS,
    STAGING,
    Archive,
    DownloadError,
    destinations,
    fetch,
    file_digests,
    human_size,
    installed,
    marker,
    read_checksums,
    split_dir,
)


def install(a: Archive, path: Path, out: Path, digests: dict[str, str], base: str) -> None:
    """Put a verified file where the manifest expects it, then mark it installed."""
    targets = destinations(a, out)
    ours = marker(a, out).is_file()  # what an earlier install left (partly deleted since) may be replaced
    for t in targets:
        if t.exists() and not ours:
            raise DownloadError(f"{t} already exists but was not written by this download; move it away "
                                "(or choose another --out) and rerun")
        if t.is_dir():
            shutil.rmtree(t)
        elif t.exists():
            t.unlink()
    folder = targets[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    if a.kind == "groupings":
        os.replace(path, targets[0])
    else:
        tmp = path.with_name(path.name + ".unpacking")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            count = _extract(a, path, tmp)
            if a.kind == "labels":
                csv = tmp / f"{a.stem}.csv"
                if not csv.is_file():
                    raise DownloadError(f"{a.name}: holds no {csv.name}, so it is not the official archive; "
                                        "it was deleted: rerun to download it again, or use another --base-url")
                os.replace(csv, targets[1])
            os.replace(tmp, targets[0])
        except DownloadError:
            path.unlink(missing_ok=True)  # whatever passed the checks, it is not a usable archive
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path.unlink()
        print(f"{a.name}: unpacked {count:,} files into {targets[0]}")
    record = {"bytes": size, "sha256": digests["sha256"], "source": base + a.name}
    marker(a, out).write_text(json.dumps(record) + "\n")


def _extract(a: Archive, path: Path, dest: Path) -> int:
    """Unpack into dest, dropping the archive's own top folder; refuse members that escape it."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            for info in members:  # all checked before anything is written
                if _unsafe(info.filename):
                    raise DownloadError(f"{a.name}: member {info.filename!r} would be written outside the dataset "
                                        "folder (absolute path or '..'); the archive is unsafe, so it was deleted "
                                        f"and nothing was unpacked; get it from the official source ({OFFICIAL_URL})")
            count = 0
            for info in members:
                rel = info.filename.removeprefix(f"{a.stem}/")
                if not rel or info.is_dir():
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                count += 1
            return count
    except zipfile.BadZipFile as err:  # also a CRC error inside a member
        raise DownloadError(f"{a.name}: not a valid zip archive ({err}); it was deleted: rerun to download it "
                            "again, or use another --base-url") from None


def _unsafe(member: str) -> bool:
    parts = PurePosixPath(member).parts
    return (member.startswith(("/", "\\")) or "\\" in member or ".." in parts
            or re.match(r"[A-Za-z]:", member) is not None)


def download_isic2018(out, parts: list[str] | None = None, base_url: str | None = None,
                      progress: bool = True, check: bool = True) -> Path:
    """Download, verify and unpack `parts` (archive names or split names; default: all) into OUT.

    `base_url` (else $SKINCLR_ISIC_MIRROR, else the official bucket) must serve the official
    file names. If it also serves SHA256SUMS, those checksums are verified (they take precedence
    over the published ones). With `check`, every complete split is validated by `skinclr.data.manifest`.
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
    from skinclr.data.manifest import check_folder, summary_table

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
