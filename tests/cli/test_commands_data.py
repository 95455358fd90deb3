"""`skinclr data check` and `skinclr data synth` as a user runs them: exit codes and what they print."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from skinclr.data.manifest import read_manifest
from skinclr.data.manifest import TRAINING_GT, TRAINING_INPUT
from skinclr.names import CLASSES

REPO_ROOT = Path(__file__).resolve().parents[2]


def skinclr(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skinclr.cli.main", "data", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_check_prints_the_summary(synth_dir):
    done = skinclr("check", synth_dir, "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "280" in done.stdout and "lesions" in done.stdout
    assert all(name in done.stdout for name in CLASSES)


def test_check_prints_one_line_per_problem(synth_dir, tmp_path):
    root = shutil.copytree(synth_dir, tmp_path / "isic")
    lines = (root / TRAINING_GT).read_text().splitlines()
    image = lines[5].split(",")[0]
    lines[5] = image + "," + ",".join(["0.0"] * 7)
    (root / TRAINING_GT).write_text("\n".join(lines) + "\n")
    broken = sorted((root / TRAINING_INPUT).glob("*.jpg"))[10]
    broken.write_bytes(b"")
    done = skinclr("check", root, "--workers", "1")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in done.stderr
    assert f"line 6 ({image})" in errors[0] and broken.name in errors[1]


def test_check_of_a_missing_folder_is_one_line(tmp_path):
    done = skinclr("check", tmp_path / "nowhere")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "nowhere" in done.stderr and "does not exist" in done.stderr


def test_synth_writes_a_readable_set_and_refuses_to_overwrite(tmp_path):
    done = skinclr("synth", tmp_path / "s", "--n", "21", "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert len(read_manifest(tmp_path / "s").frame) == 21
    assert skinclr("synth", tmp_path / "s", "--n", "21", "--seed", "2").returncode == 0
    refused = skinclr("synth", tmp_path / "s", "--n", "30", "--seed", "2")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and "n=21" in refused.stderr
