"""Unpacking a verified file where `core.data` expects it, and refusing archives that escape it.

An images archive becomes its split's `*_Input/` folder and a ground-truth archive its CSV beside
that folder (the archive's licence files stay in a folder of their own, e.g.
OUT/ISIC2018_Task3_Training_GroundTruth/); the groupings CSV is moved in as it is. An unpacked
archive is deleted once its marker is written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from core.archives import Archive, DownloadError, destinations, marker
from core.fetch import CHUNK, OFFICIAL_URL


def install(a: Archive, path: Path, out: Path, digests: dict[str, str], base: str) -> None:
    """Put a verified file where core.data expects it, then mark it installed."""
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
