"""`skinclr gc`: delete the resume checkpoints of runs that ended.

A run's resume state (the model with its optimizer state, 100-200 MB for a ResNet-18) sits
under the checkpoint root while the run can still resume; a run that finishes deletes its own.
What stays behind belongs to runs that finished before that rule, were deleted in MLflow, or
were killed (those resume from it, so they are kept unless asked). Models, backbones and
figures are MLflow artifacts: nothing here touches them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mlflow.exceptions import MlflowException

from skinclr.track import store, tracking
from skinclr.runtime import BusyError, lock

RESUMABLE = ("KILLED", "FAILED", "RUNNING")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _status(client, run_id: str) -> str:
    """The run's status, DELETED for a run in MLflow's bin, GONE for one the store does not know."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return "GONE"
    return "DELETED" if run.info.lifecycle_stage == "deleted" else run.info.status


def collect(unfinished: bool = False, dry_run: bool = False) -> str:
    """Delete (or, dry, list) the checkpoint folders of ended runs; return what happened, in words.

    A folder whose run is unknown to the store is deleted only beside a local SQLite store: a
    shared checkpoint folder may hold the runs of other stores. A run a process still trains
    (its lock is held) is never touched."""
    root = store.checkpoint_root()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "locks") if root.is_dir() else []
    if not folders:
        return f"no resume checkpoints under {root}"
    client = tracking.client()
    own_root = store.sqlite_path() is not None and root == store.checkpoint_root(store.tracking_uri())
    lines, freed, kept = [], 0, 0
    for folder in folders:
        status = _status(client, folder.name)
        ended = status in ("FINISHED", "DELETED") or (status == "GONE" and own_root) or (
            unfinished and status in RESUMABLE)
        if not ended:
            kept += 1
            why = "resumes from it; --unfinished deletes it" if status in RESUMABLE else "unknown to this store"
            lines.append(f"kept     {folder.name}  {status:<8} {_size(folder) / 2**20:8.1f} MiB  ({why})")
            continue
        try:
            held = lock(folder / "run.lock")
        except BusyError:
            kept += 1
            lines.append(f"kept     {folder.name}  {status:<8} (a process is training it)")
            continue
        with held:
            size = _size(folder)
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        freed += size
        lines.append(f"{'would delete' if dry_run else 'deleted':<8} {folder.name}  {status:<8} {size / 2**20:8.1f} MiB")
    done = len(folders) - kept
    verb = "would free" if dry_run else "freed"
    lines.append(f"{verb} {freed / 2**20:.1f} MiB from {done} run(s) under {root}; kept {kept}")
    return "\n".join(lines)
