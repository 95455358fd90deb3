"""`skinclr data download isic2018` end to end, against a local server that serves a tiny release
in the official archive format, supports Range requests, and can cut a transfer or serve a bad file."""
from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinclr.data import fetch
from skinclr.data.fetch import ARCHIVES, DownloadError
from skinclr.data.manifest import read_manifest
from skinclr.data.download import download_isic2018
from skinclr.data.fetch import CHECKSUMS, MIRROR_ENV
from skinclr.names import CLASSES
from skinclr.cli.main import main

TRAINING_INPUT = "ISIC2018_Task3_Training_Input.zip"
TRAINING_GT = "ISIC2018_Task3_Training_GroundTruth.zip"
GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"
SPLIT_IMAGES = {  # split -> (image ids, their class indices)
    "Training": ([f"ISIC_{24306 + i:07d}" for i in range(9)], [0, 1, 2, 3, 4, 5, 6, 1, 1]),
    "Validation": ([f"ISIC_{34321 + i:07d}" for i in range(3)], [1, 0, 4]),
    "Test": ([f"ISIC_{34524 + i:07d}" for i in range(3)], [2, 1, 6]),
}
LESIONS = ["HAM_0000001", "HAM_0000002", "HAM_0000003", "HAM_0000004", "HAM_0000005", "HAM_0000006",
           "HAM_0000007", "HAM_0000002", "HAM_0000008"]


# ---------------------------------------------------------------------------------------------
# A tiny release in the official format


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _ground_truth(images: list[str], labels: list[int]) -> bytes:
    rows = ["image," + ",".join(CLASSES)]
    for img, k in zip(images, labels):
        rows.append(f"{img}," + ",".join("1.0" if c == k else "0.0" for c in range(len(CLASSES))))
    return ("\n".join(rows) + "\n").encode()


def _zip(path: Path, top: str, files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> None:
    """An archive laid out like the official ones: one top folder named after the archive."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", "")
        for name, data in files.items():
            zf.writestr(f"{top}/{name}", data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


def _publish(served: Path) -> None:
    """SHA256SUMS of everything served, in `sha256sum` format."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
             for p in sorted(served.iterdir()) if p.name != CHECKSUMS]
    (served / CHECKSUMS).write_text("\n".join(lines) + "\n")


@pytest.fixture
def release(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """The seven official files (and SHA256SUMS) in a folder; also returns every image's bytes."""
    served = tmp_path / "served"
    served.mkdir()
    licence = {"LICENSE.txt": b"CC-BY-NC 4.0\n", "ATTRIBUTION.txt": b"test images\n"}
    jpegs = {}
    for split, (images, labels) in SPLIT_IMAGES.items():
        files = {f"{img}.jpg": _jpeg(i + 100 * len(jpegs)) for i, img in enumerate(images)}
        jpegs.update(files)
        _zip(served / f"ISIC2018_Task3_{split}_Input.zip", f"ISIC2018_Task3_{split}_Input", {**files, **licence})
        gt = f"ISIC2018_Task3_{split}_GroundTruth"
        _zip(served / f"{gt}.zip", gt, {f"{gt}.csv": _ground_truth(images, labels), **licence})
    images = SPLIT_IMAGES["Training"][0]
    rows = ["image,lesion_id,diagnosis_confirm_type"]
    rows += [f"{img},{lesion},histopathology" for img, lesion in zip(images, LESIONS)]
    (served / GROUPINGS).write_text("\n".join(rows) + "\n")
    _publish(served)
    return served, jpegs


class ArchiveServer(ThreadingHTTPServer):
    """Serves one folder on 127.0.0.1; logs (file, Range header) per request; can cut one transfer."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root
        self.log: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}  # file -> byte offset at which its next transfer is dropped, once
        self.ranges = True  # False: answer every request with the whole file (200), like some mirrors

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.log if n == name]


class RangeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        self.server.log.append((name, rng))
        path = self.server.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if rng and self.server.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = self.server.cut.pop(name, None)
        self.wfile.write(data[start:cut])  # HTTP/1.0: the connection closes after this, short or not


@pytest.fixture
def server(release):
    srv = ArchiveServer(release[0])
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    """Short waits so that retry paths take milliseconds; the attempt count stays bounded as shipped."""
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.05)
    monkeypatch.setattr(fetch, "TIMEOUT_S", 10.0)
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_images(folder: Path, split: str, jpegs: dict[str, bytes]) -> None:
    images = SPLIT_IMAGES[split][0]
    found = sorted(p.name for p in folder.glob("*.jpg"))
    assert found == sorted(f"{img}.jpg" for img in images)
    for name in found:
        assert (folder / name).read_bytes() == jpegs[name], name


# ---------------------------------------------------------------------------------------------
# Tests


def test_cli_downloads_all_parts_into_the_official_layout_and_checks_them(server, release, tmp_path, capsys):
    out = tmp_path / "isic2018"
    assert main(["data", "download", "isic2018", "--out", str(out), "--base-url", server.url]) == 0
    served, jpegs = release

    _assert_images(out / "ISIC2018_Task3_Training_Input", "Training", jpegs)
    _assert_images(out / "validation" / "ISIC2018_Task3_Validation_Input", "Validation", jpegs)
    _assert_images(out / "test" / "ISIC2018_Task3_Test_Input", "Test", jpegs)
    assert (out / GROUPINGS).read_bytes() == (served / GROUPINGS).read_bytes()
    assert (out / "ISIC2018_Task3_Training_Input" / "LICENSE.txt").is_file()
    assert (out / "ISIC2018_Task3_Training_GroundTruth" / "ATTRIBUTION.txt").is_file()  # licence kept

    # Each split folder is a dataset as skinclr.data.manifest reads it.
    for folder, layout, n in [(out, "isic2018-training", 9), (out / "validation", "isic2018-validation", 3),
                              (out / "test", "isic2018-test", 3)]:
        manifest = read_manifest(folder)
        assert (manifest.layout, len(manifest.frame)) == (layout, n)
    assert read_manifest(out).lesion_count() == 8
    assert read_manifest(out).class_counts() == {"MEL": 1, "NV": 3, "BCC": 1, "AKIEC": 1, "BKL": 1, "DF": 1, "VASC": 1}

    printed = capsys.readouterr().out
    for layout in ("isic2018-training", "isic2018-validation", "isic2018-test"):
        assert f"[{layout}]" in printed  # the data check's summary of each split
    # Nothing half-done or redundant is left behind: archives are gone once unpacked.
    assert sorted(p.name for p in (out / ".downloads").iterdir()) == sorted(f"{a.name}.installed" for a in ARCHIVES)


def test_rerun_after_success_does_not_touch_the_network(server, tmp_path, capsys):
    out = tmp_path / "isic2018"
    download_isic2018(out, base_url=server.url, progress=False)
    requests = len(server.log)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    assert download_isic2018(out, base_url=server.url, progress=False) == out
    assert len(server.log) == requests
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert capsys.readouterr().out.count("skipped") == len(ARCHIVES)

    # A deleted piece comes back, and only its archive is fetched again.
    (out / "ISIC2018_Task3_Training_GroundTruth.csv").unlink()
    download_isic2018(out, base_url=server.url, progress=False)
    assert [name for name, _ in server.log[requests:]] == [CHECKSUMS, TRAINING_GT]
    assert len(read_manifest(out).frame) == 9


@pytest.mark.parametrize("ranges", [True, False], ids=["server-resumes", "server-ignores-range"])
def test_cut_transfer_resumes_from_the_cut_offset(server, release, tmp_path, monkeypatch, ranges):
    served, jpegs = release
    archive = served / TRAINING_INPUT
    cut = archive.stat().st_size // 2
    server.cut[TRAINING_INPUT] = cut
    server.ranges = ranges
    monkeypatch.setenv(MIRROR_ENV, server.url)  # the mirror comes from the environment here
    out = tmp_path / "isic2018"

    download_isic2018(out, parts=["training"], progress=False)

    # The second request asks for the rest, from exactly where the first one was cut.
    assert server.requests_for(TRAINING_INPUT) == [None, f"bytes={cut}-"]
    record = json.loads((out / ".downloads" / f"{TRAINING_INPUT}.installed").read_text())
    assert (record["bytes"], record["sha256"]) == (archive.stat().st_size, _sha256(archive))
    _assert_images(out / "ISIC2018_Task3_Training_Input", "Training", jpegs)
    assert len(read_manifest(out).frame) == 9


@pytest.mark.parametrize("left", ["half", "all", "too-much"])
def test_part_file_left_by_an_interrupted_run_is_resumed(server, release, tmp_path, left):
    served, jpegs = release
    data = (served / TRAINING_INPUT).read_bytes()
    part = {"half": data[: len(data) // 2], "all": data, "too-much": data + b"stale"}[left]
    downloads = tmp_path / "isic2018" / ".downloads"
    downloads.mkdir(parents=True)
    (downloads / f"{TRAINING_INPUT}.part").write_bytes(part)

    download_isic2018(tmp_path / "isic2018", parts=[TRAINING_INPUT], base_url=server.url, progress=False)

    expected = {"half": [f"bytes={len(part)}-"],  # only the rest is fetched
                "all": [f"bytes={len(part)}-"],  # answered 416: nothing left, the part is complete
                "too-much": [f"bytes={len(part)}-", None]}[left]  # 416 with another size: start over
    assert server.requests_for(TRAINING_INPUT) == expected
    _assert_images(tmp_path / "isic2018" / "ISIC2018_Task3_Training_Input", "Training", jpegs)


def test_corrupt_archive_is_refused_and_nothing_of_it_is_trusted(server, release, tmp_path):
    served, _ = release
    archive = served / TRAINING_INPUT
    good = archive.read_bytes()
    bad = bytearray(good)
    for i in range(len(bad) // 2, len(bad) // 2 + 16):  # same size, 16 bytes flipped
        bad[i] ^= 0xFF
    archive.write_bytes(bytes(bad))
    out = tmp_path / "isic2018"

    with pytest.raises(DownloadError) as err:
        download_isic2018(out, parts=["training"], base_url=server.url, progress=False)
    message = str(err.value)
    assert TRAINING_INPUT in message
    assert hashlib.sha256(good).hexdigest() in message and hashlib.sha256(bad).hexdigest() in message
    assert "rerun" in message
    assert not (out / "ISIC2018_Task3_Training_Input").exists()
    downloads = out / ".downloads"
    assert not (downloads / TRAINING_INPUT).exists() and not (downloads / f"{TRAINING_INPUT}.part").exists()
    assert not (downloads / f"{TRAINING_INPUT}.installed").exists()

    # Once the server holds the right file again, a plain rerun repairs the folder.
    archive.write_bytes(good)
    download_isic2018(out, parts=["training"], base_url=server.url, progress=False)
    assert len(read_manifest(out).frame) == 9
    assert not (downloads / f"{TRAINING_INPUT}.corrupt").exists()


def test_published_checksum_holds_for_a_mirror_without_sha256sums(server, release, tmp_path):
    served, _ = release
    (served / CHECKSUMS).unlink()
    out = tmp_path / "isic2018"

    with pytest.raises(DownloadError, match="md5 checksum mismatch: expected 0c281f121070a8d63457caffcdec439a"):
        download_isic2018(out, parts=[TRAINING_INPUT], base_url=server.url, progress=False)
    assert not (out / "ISIC2018_Task3_Training_Input").exists()

    # A file with no published checksum is accepted on its size alone; an incomplete split is not checked.
    download_isic2018(out, parts=[TRAINING_GT], base_url=server.url, progress=False)
    assert (out / "ISIC2018_Task3_Training_GroundTruth.csv").read_text().startswith("image,MEL,NV")


@pytest.mark.parametrize("member", ["../escaped.txt", "ISIC2018_Task3_Training_Input/../../escaped.txt", "ABSOLUTE"])
def test_zip_slip_member_is_rejected(server, release, tmp_path, member):
    served, jpegs = release
    if member == "ABSOLUTE":
        member = str(tmp_path / "elsewhere" / "escaped.txt")
    files = {name: data for name, data in jpegs.items() if name[:-4] in SPLIT_IMAGES["Training"][0]}
    _zip(served / TRAINING_INPUT, "ISIC2018_Task3_Training_Input", files, extra={member: b"gotcha"})
    _publish(served)  # the archive passes its checksum: only its content is bad
    out = tmp_path / "isic2018"

    with pytest.raises(DownloadError, match=re.escape(repr(member))) as err:
        download_isic2018(out, parts=["training"], base_url=server.url, progress=False)
    assert TRAINING_INPUT in str(err.value)
    assert list(tmp_path.rglob("escaped.txt")) == []
    assert not (out / "ISIC2018_Task3_Training_Input").exists()
    assert not (out / ".downloads" / TRAINING_INPUT).exists()


def test_data_check_failure_after_download_is_an_error(server, release, tmp_path, capsys):
    served, _ = release
    images, labels = SPLIT_IMAGES["Training"]
    gt = "ISIC2018_Task3_Training_GroundTruth"
    _zip(served / f"{gt}.zip", gt, {f"{gt}.csv": _ground_truth(images + ["ISIC_0099999"], labels + [1])})
    _publish(served)

    with pytest.raises(DownloadError, match="download finished but the data check"):
        download_isic2018(tmp_path / "isic2018", parts=["training"], base_url=server.url, progress=False)
    assert "ISIC_0099999" in capsys.readouterr().err


def test_wrong_mirror_and_unknown_part_are_clear_errors(server, tmp_path, capsys):
    wrong = server.url + "nowhere/"
    assert main(["data", "download", "isic2018", "--out", str(tmp_path / "a"), "--base-url", wrong]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.match(r"error: .*ISIC2018_Task3_Training_Input\.zip: HTTP 404 .*--base-url", errors[0])
    with pytest.raises(DownloadError, match="unknown part 'train'.*training, validation, test"):
        download_isic2018(tmp_path / "b", parts=["train"], base_url=server.url, progress=False)
