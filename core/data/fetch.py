"""The seven official ISIC 2018 Task 3 files (names, sizes, checksums, where each one lands) and
their resumable, verified transfers from the ISIC bucket or a mirror.

Each split gets the official layout in a folder of its own, because a folder holds one split for
`skinclr.data.manifest` (and for `skinclr evaluate --data DIR`): the training split in OUT, the
others in OUT/validation and OUT/test. An installed file is remembered by a marker in
OUT/.downloads/, so a rerun touches the network only for what is missing.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from skinclr import __version__
from tqdm.auto import tqdm

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


OFFICIAL_URL = "https://isic-challenge-data.s3.amazonaws.com/2018/"
MIRROR_ENV = "SKINCLR_ISIC_MIRROR"  # a mirror serving the official file names (overridden by base_url)
CHECKSUMS = "SHA256SUMS"  # `sha256sum` output a mirror may serve next to the files

ATTEMPTS = 6  # per file, resuming each time; then give up and say how to go on
BACKOFF_S = 1.0  # first wait between attempts, doubled each time, capped at MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
TIMEOUT_S = 60.0  # a socket silent for this long counts as a failed attempt
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
CHUNK = 1 << 20
NETWORK_ERRORS = (URLError, ConnectionError, TimeoutError, HTTPException)


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


def read_checksums(base: str) -> dict[str, str]:
    """name -> sha256 from the server's SHA256SUMS; empty when it serves none."""
    url = base + CHECKSUMS

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
                                "fix the mirror's checksum list or remove it")
        sums[match.group(2)] = match.group(1).lower()
    return sums


def fetch(a: Archive, base: str, path: Path, checksums: dict[str, str], progress: bool) -> dict[str, str]:
    """Download into NAME.part (resuming), verify, and rename to NAME; returns the file's digests."""
    url = base + a.name
    part = path.with_name(path.name + ".part")
    try:
        total = _retrying(url, lambda: _transfer(url, part, a.name, progress))
    except HTTPError as err:
        raise _http_error(url, err) from None
    if a.name in checksums:
        expected, source = {"sha256": checksums[a.name]}, base + CHECKSUMS
    else:
        expected, source = ({"md5": a.md5}, "the published checksum") if a.md5 else ({}, "")
    digests = file_digests(part, ["sha256", *expected])
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
    print(f"{a.name}: {human_size(size)} downloaded, {how}")
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


def file_digests(path: Path, algos: list[str]) -> dict[str, str]:
    hashes = {algo: hashlib.new(algo, usedforsecurity=False) for algo in algos}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
