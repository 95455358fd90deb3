"""What makes writes safe and a run resumable exactly: device, seeds, RNG state, atomic
checkpoint files, one process at a time, and a full disk said as such.

The lock is an exclusive lock on a file, released by the kernel when its holder dies, so a killed
run or promotion never blocks the next one: there is no stale lock to clear. The holder's pid is
written into the file, so whoever waits can say which process is in the way.

A write that runs out of space fails in many voices (torch's "unexpected pos", SQLite's
"database or disk is full", or "disk I/O error", an OSError 28 from a copy); every one of them
means the same fix, so every one becomes NoSpaceError naming the folder, for a checkpoint folder
and a tracking store alike. It is not an outage: waiting does not free space, so nothing retries
it. The tracking store and the command line import this module for that error, so torch and
numpy load only in the functions that use them.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from skinclr.config import ConfigError

if TYPE_CHECKING:
    import torch

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


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is visible here; use {key}=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_devices(cfg) -> None:
    """Fail before any data is cached or a run is opened if a device the config names is absent."""
    pick_device(cfg.train.device, "train.device")
    pick_device(cfg.augment.device, "augment.device")


def describe_device(device: torch.device) -> str:
    """What a run trains on, for its tags: `cuda:0 NVIDIA H200`, or the CPU's model and widest
    vector units (`cpu AMD EPYC (AVX2)`): CPUs of one machine kind differ twofold in speed by them."""
    import torch

    if device.type == "cpu":
        units = cpu_units()
        return " ".join(filter(None, ["cpu", cpu_info().get("model name"), units and f"({units})"]))
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (`model name`, `flags`); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0].splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first) if k.strip()}


def cpu_units() -> str:
    """The vector units that set this CPU's training speed: AVX2, AVX-512, AMX (bf16); '' where unknown."""
    flags = set(cpu_info().get("flags", "").split())
    units = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "",
             "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else ""]
    return ", ".join(filter(None, units))


def cpu_bf16_units() -> bool | None:
    """Whether this CPU computes bf16 in hardware (AMX or AVX-512 BF16); None where unknown."""
    flags = cpu_info().get("flags")
    return None if flags is None else bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and ints (loads with weights_only=True)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def interrupts_deferred():
    """Ctrl-C or SIGTERM arriving inside the block takes effect when it ends: torch.save cut
    short raises an error of its own, which would hide the interrupt and fail the run instead
    of leaving it resumable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename: a kill mid-write never leaves a torn file,
    and an interrupt waits for the write to end."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with interrupts_deferred():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as err:
            tmp.unlink(missing_ok=True)  # a half-written file would keep the disk full
            if out_of_space(err, path.parent):
                raise no_space(path.parent, f"saving {path.name}", "free space there (or set SKINCLR_CHECKPOINTS "
                               "to a folder with room) and run the same command: the run resumes") from None
            raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


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
