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


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.strip().splitlines()[0][:60])
def test_readme_block_runs(block, tmp_path, real_data_dir):
    """Run in a scratch copy of the checkout's layout, with the project's .venv on PATH."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("experiments", "search_spaces"):
        shutil.copytree(REPO / name, work / name)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / real_data_dir.name).symlink_to(real_data_dir)
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI")  # the README's commands use the default store in ./mlruns
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{proc.stderr[-3000:]}"
