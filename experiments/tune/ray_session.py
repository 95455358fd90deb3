"""Ray for one command: join the cluster in RAY_ADDRESS (or the one a submitted sweep runs on), or start a
local one and stop it after."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def ray_session():
    """Join the cluster in RAY_ADDRESS, or start a local Ray for this command and stop it after."""
    import ray

    # Keeping two checkpoints per trial makes Tune snapshot its state every other report, by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own console report (a settings box and a TensorBoard hint) repeats what the sweep's
    # progress lines and MLflow already show; the legacy reporter honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        yield
        return
    # A new local cluster keeps Ray's default token auth; only the notice that it is the default goes.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ctrl-C stops the driver at once, as KeyboardInterrupt; the sweep's state is on disk and
    # --resume continues it. (Tune's own handler would stop the running trials and return as if
    # the sweep had ended, and the trials it cut short would look finished.)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    term = signal.getsignal(signal.SIGTERM)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level="WARNING")
    if callable(term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, term)  # ray.init's own handler would kill the driver outright
    try:
        yield
    finally:
        ray.shutdown()


def join_cluster() -> None:
    """Connect to the running cluster before the sweep does (it then reuses the connection).

    In a `ray job submit` job the process starts in Ray's unpacked copy of the working folder,
    and connecting makes Ray unpack that copy again: it deletes the folder and extracts it anew
    (under `<folder>.zip.lock`). The process waits for the new copy and moves into it, so
    relative paths and later imports read complete files."""
    import ray

    def inode(path: Path) -> int | None:
        try:
            return path.stat().st_ino
        except OSError:
            return None

    folder = Path.cwd()
    before = inode(folder)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", include_dashboard=False, logging_level="WARNING")
    if "working_dir_files" not in folder.parts:  # not a job's copy
        return
    from filelock import FileLock

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and inode(folder) in (None, before):
        time.sleep(0.2)
    with FileLock(f"{folder}.zip.lock", timeout=120):
        os.chdir(folder)
