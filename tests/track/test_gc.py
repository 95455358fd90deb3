"""`skinclr gc`: the resume checkpoints of ended runs go, those a run can still resume from stay."""
from __future__ import annotations

from skinclr.track import tracking
from skinclr.runtime import lock
from skinclr.track.gc import collect

from skinclr.track.tracking import RunLogger
from skinclr.cli.main import main
from skinclr.track.store import checkpoint_root


def leftover(status: str | None, mib: int = 2) -> str:
    """A run of that status (None: one the store never knew) with a resume folder of `mib` MiB."""
    run_id = "0" * 32
    if status is not None:
        logger = RunLogger.create("gc")
        if status != "RUNNING":
            logger.end(status)
        run_id = logger.run_id
    folder = checkpoint_root() / run_id
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"\0" * (mib << 20))
    return run_id


def test_gc_deletes_ended_runs_checkpoints_and_keeps_resumable_ones(capsys):
    finished, deleted, gone = leftover("FINISHED"), leftover("FINISHED"), leftover(None)
    tracking.client().delete_run(deleted)
    killed, failed, running = leftover("KILLED"), leftover("FAILED"), leftover("RUNNING")
    busy = leftover("FINISHED")
    holder = lock(checkpoint_root() / busy / "run.lock")  # a process still at work on it

    dry = collect(dry_run=True)
    assert "would free 6.0 MiB from 3 run(s)" in dry
    assert all((checkpoint_root() / r).exists() for r in (finished, deleted, gone))

    assert main(["gc"]) == 0
    out = capsys.readouterr().out
    assert "freed 6.0 MiB from 3 run(s)" in out and "kept 4" in out
    assert not any((checkpoint_root() / r).exists() for r in (finished, deleted, gone))
    assert all((checkpoint_root() / r / "checkpoint.pt").exists() for r in (killed, failed, running, busy))

    holder.close()
    message = collect(unfinished=True)
    assert "freed 8.0 MiB from 4 run(s)" in message
    assert [p.name for p in checkpoint_root().iterdir() if p.name != "locks"] == []
