"""The `skinclr` command as a process: its exit skips the interpreter's teardown, not its work."""
from __future__ import annotations

import subprocess
import sys


def skinclr(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skinclr.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_command_exits_with_its_code_after_every_exit_handler_and_every_line(tmp_path):
    done = skinclr("data", "synth", str(tmp_path / "set"), "--n", "30", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "set" / "skinclr_synth.json").is_file() and str(tmp_path / "set") in done.stdout
    checked = skinclr("data", "check", str(tmp_path / "set"), cwd=tmp_path)
    assert checked.returncode == 0 and "30" in checked.stdout  # the summary, flushed before the exit
    wrong = skinclr("finetune", "--set", "train.epoch=1", cwd=tmp_path)
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: unknown config key 'train.epoch'")
    # an exit handler of the process (here: one a library registers) still runs before the exit
    probe = (f"import atexit, sys; sys.argv = ['skinclr', 'data', 'synth', {str(tmp_path / 'set')!r}, '--n', '30']; "
             "atexit.register(lambda: print('handler ran', flush=True)); "
             "from skinclr.cli.main import run; run()")
    ran = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.rstrip().endswith("handler ran")
