"""A sweep on a running Ray cluster, as `ray submit` or `ray job submit` runs it on the head:

    ray submit docker/cluster.yaml experiments/cli/submit.py -- --config experiments/sweeps/finetune_asha.yaml --set k=v
    ray job submit --working-dir . -- python experiments/cli/submit.py --config /abs/sweep.yaml --set k=v

It is `skinclr sweep` joined to the running cluster instead of a Ray of its own, with
what the cluster's environment names: the tracking server every trial logs to
(MLFLOW_TRACKING_URI, required: trials on other machines cannot write into a local store) and
the sweep's storage (SKINCLR_SWEEP_STORAGE, a folder every node mounts; `--set sweep.storage=`
wins). A relative `--config` is looked up in the working folder, then in the installed project,
since `ray submit` runs this file from the head's home folder.
"""
from __future__ import annotations

import os
import sys

STORAGE_ENV = "SKINCLR_SWEEP_STORAGE"


def sweep_arguments(argv: list[str], env: dict[str, str]) -> list[str]:
    """`skinclr sweep` arguments: the config found, the cluster's sweep storage unless set."""
    from skinclr.tune.spaces import project_path

    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            args[i + 1] = str(project_path(args[i + 1]))
        elif arg.startswith("--config="):
            args[i] = f"--config={project_path(arg.split('=', 1)[1])}"
    storage = env.get(STORAGE_ENV, "").strip()
    if storage and not any(a.startswith("sweep.storage=") for a in args):
        args += ["--set", f"sweep.storage={storage}"]
    return ["sweep", *args]


def store_problem(env: dict[str, str]) -> str | None:
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if uri.startswith(("http://", "https://")):
        return None
    return (f"MLFLOW_TRACKING_URI is {uri or 'not set'} on the head, but a cluster's trials log to a tracking "
            "server: set MLFLOW_TRACKING_URI=http://HOST:5000 in the cluster's environment (docker/cluster.yaml "
            "run_options, or ~/.skinclr-env in docker/cluster-local.yaml)")


def main(argv: list[str] | None = None) -> int:
    problem = store_problem(dict(os.environ))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args = sweep_arguments(sys.argv[1:] if argv is None else argv, dict(os.environ))
    from skinclr.cli.main import main as skinclr
    from skinclr.tune import sweep  # noqa: F401 - the sweep layer and torch load before Ray connects
    from skinclr.tune.tuner import join_cluster

    try:
        join_cluster()
    except ConnectionError as err:  # no cluster where RAY_ADDRESS (or `ray start`) points
        print(f"error: no running Ray cluster to join ({err}); start one with `ray up CLUSTER.yaml`", file=sys.stderr)
        return 2
    return skinclr(args)


if __name__ == "__main__":
    sys.exit(main())
