"""Ray for one command: join the cluster in RAY_ADDRESS, or start a local one and stop it after."""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager


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
