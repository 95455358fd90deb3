"""Every README command block fenced as `bash` runs here, as a user would paste it.

The README's examples read the user's dataset folder as `$DIR`; the user sets it once, in a
block fenced `sh`. Here every block runs with `DIR` set to the real ISIC 2018 data instead
(the `real_data_dir` fixture). Blocks that need what this machine lacks (a Ray cluster, a GPU,
the internet, hours) are fenced as `sh` and say so. The first block (`./dev.sh quickstart` /
`./dev.sh test`) is the setup this suite already runs under; its two halves are tested by
test_quickstart.py and by this run itself.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
SH_BLOCKS = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
SETUP_BLOCK = "./dev.sh quickstart"


def runnable_blocks() -> list[str]:
    return [b for b in BLOCKS if SETUP_BLOCK not in b]


def test_readme_has_the_two_commands():
    first = BLOCKS[0]
    assert "./dev.sh quickstart" in first and "./dev.sh test" in first
    assert "./dev.sh test" in (REPO / ".ci" / "run").read_text()


def test_the_examples_read_the_users_folder_from_dir():
    """The user sets DIR once (a block that is not run); the runnable blocks only read it, and
    no example names a path that exists only beside this checkout."""
    assert any(re.search(r"^DIR=\S+", b, flags=re.M) for b in SH_BLOCKS), "no block sets DIR for the user"
    for block in runnable_blocks():
        assert not re.search(r"^\s*(export\s+)?DIR=", block, flags=re.M), f"a runnable block sets DIR:\n{block}"
    assert any("$DIR" in b for b in runnable_blocks())
    for block in runnable_blocks() + SH_BLOCKS:
        assert "../shared" not in block, f"an example uses a development-only path:\n{block}"


def test_the_command_table_lists_every_command():
    from skinclr.cli.main import build_parser

    def commands(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = list(commands(sub, f"{prefix}{name} "))
                    yield from nested or [f"{prefix}{name}"]

    table = [line for line in README.splitlines() if line.startswith("| `skinclr ")]
    missing = [c for c in commands(build_parser()) if not any(f"| `skinclr {c}" in row for row in table)]
    assert not missing, f"commands missing from the README's command table: {missing}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch folder laid out like the checkout; the blocks run in it one after another, as a
    user pastes them (later blocks use earlier results)."""
    work = tmp_path_factory.mktemp("readme") / "checkout"
    work.mkdir()
    for name in ("experiments", "search_spaces"):
        shutil.copytree(REPO / name, work / name)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.strip().splitlines()[0][:60])
def test_readme_block_runs(block, checkout, real_data_dir):
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "DIR": str(real_data_dir)}  # what the README's `DIR=path/to/your/isic2018-folder` sets for a user
    env.pop("MLFLOW_TRACKING_URI", None)  # the README's commands use the default store in ./mlruns
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{proc.stderr[-3000:]}"
