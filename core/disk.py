"""A full disk, said as such: one error for a checkpoint folder and a tracking store alike.

A write that runs out of space fails in many voices (torch's "unexpected pos", SQLite's
"database or disk is full", or "disk I/O error", an OSError 28 from a copy); every one of them
means the same fix, so every one becomes NoSpaceError naming the folder. It is not an outage:
waiting does not free space, so nothing retries it.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

LOW_SPACE = 1 << 20  # bytes: less free than this where a write failed, and the disk is full


class NoSpaceError(OSError):
    """A write failed because its disk is full; the message names the folder and the fix."""


def free_bytes(path: Path) -> int | None:
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def out_of_space(err: BaseException, path: Path | None = None) -> bool:
    """Whether `err` (or what caused it) says the disk is full, or `path`'s disk has no room left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "disk is full" in str(seen).lower() or "no space left" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(path) if path is not None else None
    return free is not None and free < LOW_SPACE


def no_space(folder: Path, what: str, fix: str) -> NoSpaceError:
    return NoSpaceError(errno.ENOSPC, f"{folder}: no space left on device while {what}; {fix}")
