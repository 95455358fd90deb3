"""Every README command block fenced as `bash` runs here, as a user would paste it.

Blocks that need what this machine lacks (a Ray cluster, a GPU, the internet, hours) are
fenced as `sh` and say so. The first block (`./dev.sh quickstart` / `./dev.sh test`) is the
setup this suite already runs under; its two halves are tested by test_quickstart.py and by
this run itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
SETUP_BLOCK = "./dev.sh quickstart"


def runnable_blocks() -> list[str]:
    return [b for b in BLOCKS if SETUP_BLOCK not in b]


def test_readme_has_the_two_commands():
    first = BLOCKS[0]
    assert "./dev.sh quickstart" in first and "./dev.sh test" in first
    assert "./dev.sh test" in (REPO / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, real_data_dir) -> Path:
    """A scratch folder laid out like the checkout, with ../shared/data beside it; the blocks
    run in it one after another, as a user pastes them (later blocks use earlier results)."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "checkout"
    work.mkdir()
    for name in ("experiments", "search_spaces"):
        shutil.copytree(REPO / name, work / name)
    (root / "shared" / "data").mkdir(parents=True)
    (root / "shared" / "data" / real_data_dir.name).symlink_to(real_data_dir)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.strip().splitlines()[0][:60])
def test_readme_block_runs(block, checkout):
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI")  # the README's commands use the default store in ./mlruns
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{proc.stderr[-3000:]}"
