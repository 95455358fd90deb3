"""Download the official ISIC 2018 Task 3 archives into folders that `core.data` reads as they are.

A 2.6 GB download over a flaky link must survive being cut: every file streams into
`OUT/.downloads/NAME.part`, a broken transfer resumes from where it stopped (HTTP Range), and
only a file whose size and checksum match is renamed and unpacked. Each split gets the official
layout in its own folder, because a folder holds one split for `core.data` (and for
`skinclr evaluate --data DIR`):

    OUT/                   ISIC2018_Task3_Training_Input/, ISIC2018_Task3_Training_GroundTruth.csv,
                           ISIC2018_Task3_Training_LesionGroupings.csv
    OUT/validation/        ISIC2018_Task3_Validation_Input/, ISIC2018_Task3_Validation_GroundTruth.csv
    OUT/test/              ISIC2018_Task3_Test_Input/, ISIC2018_Task3_Test_GroundTruth.csv

A ground-truth archive's licence files stay in its own folder (e.g. OUT/ISIC2018_Task3_Training_GroundTruth/).
Unpacked archives are deleted and remembered by a marker, so a rerun touches the network only
for what is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

from core import __version__

OFFICIAL_URL = "https://isic-challenge-data.s3.amazonaws.com/2018/"
MIRROR_ENV = "SKINCLR_ISIC_MIRROR"  # a mirror serving the official file names (overridden by base_url)
MANIFEST = "SHA256SUMS"  # `sha256sum` output a mirror may serve next to the files
SPLITS = ("training", "validation", "test")

ATTEMPTS = 6  # per file, resuming each time; then give up and say how to go on
BACKOFF_S = 1.0  # first wait between attempts, doubled each time, capped at MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
TIMEOUT_S = 60.0  # a socket silent for this long counts as a failed attempt
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
CHUNK = 1 << 20
NETWORK_ERRORS = (URLError, ConnectionError, TimeoutError, HTTPException)


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
    staging = out / ".downloads"
    staging.mkdir(parents=True, exist_ok=True)

    todo = [a for a in chosen if not _installed(a, out)]
    for a in chosen:
        if a not in todo:
            print(f"{a.name}: already in {_split_dir(out, a.split)}, skipped")
    if todo:
        print(f"downloading {len(todo)} file(s), about {_human(sum(a.approx_bytes for a in todo))}, "
              f"from {base} into {out}")
    checksums = None  # fetched only when something has to be downloaded
    for a in todo:
        path = staging / a.name
        if path.is_file():  # verified by an earlier run that stopped before unpacking it
            print(f"{a.name}: verified in an earlier run")
            digests = _hash(path, ["sha256"])
        else:
            if checksums is None:
                checksums = _read_manifest(base)
            digests = _fetch(a, base, path, checksums, progress)
        _install(a, path, out, digests, base)
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


def _split_dir(out: Path, split: str) -> Path:
    return out if split == "training" else out / split


def _targets(a: Archive, out: Path) -> list[Path]:
    """What installing an archive creates: its folder and, for ground truth, the CSV beside it."""
    folder = _split_dir(out, a.split)
    if a.kind == "groupings":
        return [folder / a.name]
    if a.kind == "labels":
        return [folder / a.stem, folder / f"{a.stem}.csv"]
    return [folder / a.stem]


def _marker(a: Archive, out: Path) -> Path:
    return out / ".downloads" / f"{a.name}.installed"


def _installed(a: Archive, out: Path) -> bool:
    return _marker(a, out).is_file() and all(t.exists() for t in _targets(a, out))


# ---------------------------------------------------------------------------------------------
# Network


def _retrying(url: str, attempt):
    """Run `attempt()` until it succeeds; network errors and busy servers are retried with backoff."""
    for n in range(1, ATTEMPTS + 1):
        try:
            return attempt()
        except HTTPError as err:
            if err.code not in RETRY_STATUS or n == ATTEMPTS:
                raise
            reason = f"HTTP {err.code} {err.reason}"
        except NETWORK_ERRORS as err:
            reason = str(getattr(err, "reason", None) or err) or type(err).__name__
            if n == ATTEMPTS:
                raise DownloadError(f"{url}: failed {ATTEMPTS} times (last: {reason}); check the connection and "
                                    "rerun the command: finished bytes are kept and the download resumes") from None
        delay = min(BACKOFF_S * 2 ** (n - 1), MAX_BACKOFF_S)
        print(f"{url}: {reason}; retrying in {delay:.1f} s ({n}/{ATTEMPTS - 1})", file=sys.stderr)
        time.sleep(delay)


def _http_error(url: str, err: HTTPError) -> DownloadError:
    hint = (f"the server has no such file; check --base-url / ${MIRROR_ENV} (the official one is {OFFICIAL_URL})"
            if err.code in (403, 404) else "try again later")
    return DownloadError(f"{url}: HTTP {err.code} {err.reason}; {hint}")


def _read_manifest(base: str) -> dict[str, str]:
    """name -> sha256 from the server's SHA256SUMS; empty when it serves none."""
    url = base + MANIFEST

    def attempt():
        with urlopen(Request(url, headers={"User-Agent": f"skinclr/{__version__}"}), timeout=TIMEOUT_S) as resp:
            return resp.read().decode("utf-8")

    try:
        text = _retrying(url, attempt)
    except HTTPError as err:
        if err.code in (403, 404):  # S3 answers 403 for a missing key
            return {}
        raise _http_error(url, err) from None
    sums = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](\S.*)", line.rstrip())
        if not match:
            raise DownloadError(f"{url} line {line_no}: expected '<sha256>  <file name>', got {line[:80]!r}; "
                                "fix the mirror's manifest or remove it")
        sums[match.group(2)] = match.group(1).lower()
    return sums


def _fetch(a: Archive, base: str, path: Path, checksums: dict[str, str], progress: bool) -> dict[str, str]:
    """Download into NAME.part (resuming), verify, and rename to NAME; returns the file's digests."""
    url = base + a.name
    part = path.with_name(path.name + ".part")
    try:
        total = _retrying(url, lambda: _transfer(url, part, a.name, progress))
    except HTTPError as err:
        raise _http_error(url, err) from None
    if a.name in checksums:
        expected, source = {"sha256": checksums[a.name]}, base + MANIFEST
    else:
        expected, source = ({"md5": a.md5}, "the published checksum") if a.md5 else ({}, "")
    digests = _hash(part, ["sha256", *expected])
    for algo, want in expected.items():
        if digests[algo] != want:
            corrupt = path.with_name(path.name + ".corrupt")
            os.replace(part, corrupt)
            raise DownloadError(
                f"{a.name}: {algo} checksum mismatch: expected {want} ({source}), got {digests[algo]}. "
                f"The download is corrupt or not the official file; it was moved to {corrupt} and is not used. "
                f"Delete that file and rerun the command to download it again; if the same checksum comes back, "
                f"{base} serves a different file (use another --base-url)")
    os.replace(part, path)
    path.with_name(path.name + ".corrupt").unlink(missing_ok=True)  # an earlier bad copy, now replaced
    size = path.stat().st_size
    how = (f"{', '.join(expected)} matches {source}" if expected
           else "no published checksum, size checked only" if total is not None
           else "the server reported no size and no checksum is published: not verified")
    print(f"{a.name}: {_human(size)} downloaded, {how}")
    return digests


def _transfer(url: str, part: Path, label: str, progress: bool) -> int | None:
    """One attempt: append the rest of the file to `part`; returns the full size the server reported."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"skinclr/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as err:
        if err.code != 416 or not have:
            raise
        # Nothing left to send: the part is either complete or longer than the file (stale).
        total = _range_total(err.headers.get("Content-Range", ""))
        if total == have:
            return total
        part.unlink()
        return _transfer(url, part, label, progress)
    with resp:
        if resp.status == 206:
            start, total = _content_range(url, resp.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"{url}: asked for bytes from {have}, the server sent bytes from {start}; "
                                    f"delete {part} and rerun")
            mode = "ab"
        else:  # 200: the whole file, also when a range was asked for: start over
            length = resp.headers.get("Content-Length")
            have, mode, total = 0, "wb", int(length) if length else None
        with open(part, mode) as f, tqdm(total=total, initial=have, desc=label, unit="B", unit_scale=True,
                                         unit_divisor=1024, disable=not progress) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:  # http.client returns b"" when a server hangs up early
        raise ConnectionError(f"connection closed after {size:,} of {total:,} bytes")
    return total


def _content_range(url: str, header: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header.strip())
    if not match:
        raise DownloadError(f"{url}: the server answered a range request with Content-Range {header!r}; "
                            "use another --base-url")
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _range_total(header: str) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", header.strip())
    return int(match.group(1)) if match else None


def _hash(path: Path, algos: list[str]) -> dict[str, str]:
    hashes = {algo: hashlib.new(algo, usedforsecurity=False) for algo in algos}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---------------------------------------------------------------------------------------------
# Unpacking


def _install(a: Archive, path: Path, out: Path, digests: dict[str, str], base: str) -> None:
    """Put a verified file where core.data expects it, then mark it installed."""
    targets = _targets(a, out)
    ours = _marker(a, out).is_file()  # what an earlier install left (partly deleted since) may be replaced
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
    _marker(a, out).write_text(json.dumps(record) + "\n")


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


# ---------------------------------------------------------------------------------------------
# The data check


def _check_splits(out: Path, chosen: tuple[Archive, ...], progress: bool) -> None:
    """Validate each split that now has its images and ground truth; print its summary."""
    from core.data import check_folder, summary_table

    for split in dict.fromkeys(a.split for a in chosen):
        folder = _split_dir(out, split)
        missing = [a.name for a in ARCHIVES if a.split == split and a.kind != "groupings" and not _installed(a, out)]
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
