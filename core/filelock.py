"""One process at a time: an exclusive lock on a file, released by the kernel when its holder dies.

A killed run or promotion therefore never blocks the next one: there is no stale lock to clear.
The holder's pid is written into the file, so whoever waits can say which process is in the way.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

POLL_S = 0.2  # how often a waiting process tries again


class BusyError(RuntimeError):
    """Another process holds the lock; the message names it."""


def lock(path: str | Path, wait: float = 0.0, holder: str = "", poll: float = POLL_S) -> IO:
    """An exclusive lock on `path`, held until the returned file is closed (or the process dies).

    Raises BusyError once `wait` seconds have passed with another process holding it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.seek(0)
                pid = fh.read().strip()
                fh.close()
                raise BusyError(f"{holder or path} is in use by another process{f' (pid {pid})' if pid else ''}; "
                                "wait for it to finish, or stop it first") from None
            time.sleep(poll)
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
