"""`ray submit` for real: a two-node Ray cluster over SSH and a PostgreSQL-backed tracking server.

What a user relies on when a sweep runs on a cluster: `ray up` of docker/cluster-local.yaml
brings up the head and a worker; `ray submit` of experiments/cli/submit.py (and `ray job submit`)
runs the sweep on the head, its trials spread over both nodes, and every run, metric and artifact
lands on the tracking server (never in a local store); promote, evaluate and report work against
that server; and faults lose nothing: a worker node dying mid-trial, the tracking server gone for
30 s, the driver killed and resumed. `ray down`, and `ray stop` on the worker, end it.

All of it runs on loopback: one network namespace holding only `lo`, two SSH hosts in it (sshd
on port 22 of 127.0.0.1, the head, and of 127.0.0.2, the worker, each in its own PID namespace:
see tests/sandbox.py for why Ray's `ray stop` is harmless there), PostgreSQL and `skinclr server`
in the same namespace. Trials are
tiny (32 px synthetic images, two steps an epoch). The module shares one cluster; the worker-fault
scenario and `ray down` come last.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from skinclr.track.candidates import logged_model

from tests.sandbox import Namespace, Postgres, SSHHost, TrackingServer, cmdline, end, exe, require_root_tools, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEAD, WORKER = "127.0.0.1", "127.0.0.2"
CPUS = os.cpu_count() or 2  # a trial asks for a whole node's CPUs, so two trials need both nodes


@dataclass
class Cluster:
    ns: Namespace
    head: SSHHost
    worker: SSHHost
    server: TrackingServer
    folder: Path  # everything this module writes
    config: Path  # the cluster YAML given to ray up / submit / down
    storage: Path  # the sweeps' shared storage (SKINCLR_SWEEP_STORAGE)

    def ray(self, *args: str, log: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        """A `ray` command as a user types it, run in the namespace; output in folder/logs/<log>."""
        path = self.folder / "logs" / log
        with open(path, "w") as out:
            done = subprocess.run(self.ns.cmd(str(BIN / "ray"), *args), stdout=out, stderr=subprocess.STDOUT,
                                  env=ray_env(self.folder), timeout=timeout, **kw)
        done.log = path.read_text()
        return done

    def submit(self, *args: str, log: str) -> subprocess.Popen:
        """`ray submit CLUSTER experiments/cli/submit.py -- ARGS`, in the background."""
        out = open(self.folder / "logs" / log, "w")
        proc = subprocess.Popen(self.ns.cmd(str(BIN / "ray"), "submit", str(self.config),
                                            str(REPO / "experiments" / "cli" / "submit.py"), "--", *args),
                                stdout=out, stderr=subprocess.STDOUT, env=ray_env(self.folder), cwd=REPO)
        out.close()
        return proc

    def log(self, name: str) -> str:
        return (self.folder / "logs" / name).read_text()

    @contextmanager
    def client(self):
        with self.ns.entered():
            yield MlflowClient(tracking_uri=self.server.url, registry_uri=self.server.url)

    def skinclr(self, *args: str, log: str) -> subprocess.CompletedProcess:
        """A skinclr command on the machine the user sits at: in the namespace, logging to the server."""
        workdir = self.folder / "client"
        workdir.mkdir(exist_ok=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.server.url, "SKINCLR_CACHE": str(self.folder / "cache")}
        path = self.folder / "logs" / log
        with open(path, "w") as out:
            done = subprocess.run(self.ns.cmd(sys.executable, "-m", "skinclr.cli.main", *args), cwd=workdir, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=600)
        done.log = path.read_text()
        return done


def ray_env(folder: Path) -> dict[str, str]:
    # RAY_UP_enable_autoscaler_v2=0: Ray 2.60's default autoscaler starts no workers of the local provider
    return {**os.environ, "RAY_UP_enable_autoscaler_v2": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
            "TMPDIR": str(folder / "tmp")}


def cluster_yaml(folder: Path, key: Path, server_url: str, storage: Path) -> Path:
    """docker/cluster-local.yaml with what differs on this machine: the two loopback nodes, root's
    key, a unique name (Ray keeps per-cluster state in /tmp), and, instead of installing into a
    fresh venv (there is no network here), this checkout's venv on PATH in the same env file."""
    cfg = yaml.safe_load((REPO / "docker" / "cluster-local.yaml").read_text())
    cfg["cluster_name"] = f"skinclr-test-{uuid.uuid4().hex[:6]}"
    cfg["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    src = folder / "src"  # the slim copy, made as docker/cluster-local.yaml says
    src.mkdir()
    subprocess.run(f"git -C {REPO} archive HEAD | tar -x -C {src}", shell=True, check=True)
    cfg["file_mounts"] = dict.fromkeys(cfg["file_mounts"], str(src))  # where the shipped file syncs to
    env = {"PATH": f"{BIN}:$PATH", "MLFLOW_TRACKING_URI": server_url, "SKINCLR_SWEEP_STORAGE": str(storage),
           "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_TMPDIR": str(folder / "ray"), "SKINCLR_CACHE": str(folder / "cache")}
    lines = "".join(f"export {k}={v}\\n" for k, v in env.items())
    shipped_rc = [c for c in cfg["setup_commands"] if ".bashrc" in c]
    assert shipped_rc, "docker/cluster-local.yaml no longer sources ~/.skinclr-env from ~/.bashrc"
    cfg["setup_commands"] = [f"printf '{lines}' > ~/.skinclr-env", *shipped_rc]
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def alive_nodes(cluster_ns: Namespace) -> set[str]:
    """Addresses of the nodes the head's dashboard reports alive."""
    import urllib.request

    try:
        with cluster_ns.entered(), urllib.request.urlopen(f"http://{HEAD}:8265/nodes?view=summary", timeout=5) as r:
            nodes = json.load(r)["data"]["summary"]
    except (OSError, ValueError, KeyError):
        return set()
    return {n["raylet"]["nodeManagerAddress"] for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"}


@pytest.fixture(scope="module")
def cluster():
    require_root_tools("ip", "unshare", "setpriv", "ssh-keygen", "rsync", "/usr/sbin/sshd")
    folder = Path(tempfile.mkdtemp(prefix="skc-"))  # short: Ray's socket paths must stay under 108 bytes
    for sub in ("logs", "tmp", "ray"):
        (folder / sub).mkdir()
    stack = ExitStack()
    try:
        ns = Namespace()
        stack.callback(ns.remove)
        head = SSHHost(ns, folder / "head", HEAD)
        stack.callback(head.close)  # ends its sshd and every Ray process on it
        worker = SSHHost(ns, folder / "worker", WORKER, key=head.key)
        stack.callback(worker.close)
        pg = Postgres(ns)
        stack.callback(pg.close)
        server = TrackingServer(ns, folder / "logs" / "server.log", "--backend-store-uri", pg.uri,
                                "--artifacts-destination", str(folder / "artifacts"))
        stack.callback(server.stop)
        server.start()
        storage = folder / "sweeps"
        c = Cluster(ns, head, worker, server, folder, cluster_yaml(folder, head.key, server.url, storage), storage)
        up = c.ray("up", "-y", "--no-config-cache", str(c.config), log="ray-up.log", cwd=REPO)
        assert up.returncode == 0, up.log[-4000:]
        wait_for("the worker node", lambda: alive_nodes(ns) == {HEAD, WORKER}, 180, log=folder / "logs" / "ray-up.log")
        yield c
    finally:
        stack.close()
        shutil.rmtree(folder, ignore_errors=True)


def sweep_args(synth_dir: Path, experiment: str, epochs: int = 2, samples: int = 2, grace: int = 1) -> list[str]:
    """The shipped fine-tune sweep, shrunk: the config path is relative, as a user gives it.
    `grace` = `epochs` turns ASHA's early stops off (every trial runs all its epochs)."""
    return ["--config", "experiments/sweeps/finetune_asha.yaml", "--set", f"data.root={synth_dir}",
            "--set", "data.image_size=32", "--set", f"train.epochs={epochs}", "--set", "train.batch_size=16",
            "--set", "train.max_steps_per_epoch=2", "--set", f"sweep.num_samples={samples}",
            "--set", "sweep.search=random", "--set", f"sweep.grace_period={grace}", "--set", f"sweep.cpus_per_trial={CPUS}",
            "--set", f"tracking.experiment={experiment}", "--set", f"sweep.name={experiment}"]


def sweep_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return ([r for r in runs if r.data.tags.get("skinclr.sweep") == "1"],
            [r for r in runs if "skinclr.trial_id" in r.data.tags])


def assert_each_epoch_logged_once(client: MlflowClient, run, epochs: int) -> None:
    for key in ("train_loss", "val_loss", "val_balanced_accuracy"):
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert sorted(steps) == list(range(1, epochs + 1)) and set(steps.values()) == {1}, \
            f"{run.data.tags['skinclr.trial_id']} {key}: steps logged {dict(steps)}"


def first_epoch_logged(c: Cluster, experiment: str, node: str | None = None):
    """The run of a trial (on `node`, if given) that has logged epoch 1, or None yet."""
    try:
        with c.client() as client:
            if client.get_experiment_by_name(experiment) is None:
                return None
            for run in sweep_runs(client, experiment)[1]:
                if node and run.data.tags.get("skinclr.node_ip") != node:
                    continue
                if client.get_metric_history(run.info.run_id, "val_loss"):
                    return run
    except Exception:  # noqa: BLE001 - the store is being created; poll again
        return None
    return None


def assert_sweep_complete(c: Cluster, experiment: str, epochs: int, samples: int = 2):
    with c.client() as client:
        parents, children = sweep_runs(client, experiment)
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert len(children) == samples and {r.info.status for r in children} == {"FINISHED"}
        for run in children:
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert_each_epoch_logged_once(client, run, int(run.data.tags["skinclr.epochs_run"]))
        return parents[0], children


def test_ray_submit_runs_trials_on_both_nodes_and_logs_everything_to_the_server(cluster, synth_dir):
    done = cluster.ray("submit", str(cluster.config), str(REPO / "experiments" / "cli" / "submit.py"), "--",
                       *sweep_args(synth_dir, "on-both-nodes"), log="submit.log", cwd=REPO)
    assert done.returncode == 0, done.log[-4000:]
    assert "[sweep] best trial" in done.log

    parent, children = assert_sweep_complete(cluster, "on-both-nodes", epochs=2)
    assert {r.data.tags["skinclr.node_ip"] for r in children} == {HEAD, WORKER}
    with cluster.client() as client:
        exp = client.get_experiment_by_name("on-both-nodes")
        assert exp.artifact_location.startswith("mlflow-artifacts:"), "artifacts must go through the server"
        for run in children:
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"report", "config.yaml"} <= names
            model = logged_model(client, run.info.run_id)  # its model, a logged model stored through the server
            assert model is not None and model.artifact_location.startswith("mlflow-artifacts:"), model
        assert "sweep" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    stored = {p.name for p in (cluster.folder / "artifacts").rglob("*") if p.is_file()}
    assert {"config.yaml", "trials.csv", "confusion_matrix.png"} <= stored

    # the runner's resume files went to the sweep's shared folder, not to the node that ran the trial
    assert (cluster.storage / "on-both-nodes" / "runner-checkpoints").is_dir()

    # promote, evaluate and report, from the user's machine, against the same server
    promoted = cluster.skinclr("promote", "--experiment", "on-both-nodes", log="promote.log")
    assert promoted.returncode == 0, promoted.log
    evaluated = cluster.skinclr("evaluate", "--model", "models:/skinclr@champion", "--data", str(synth_dir),
                                "--json", str(cluster.folder / "client" / "metrics.json"), log="evaluate.log")
    assert evaluated.returncode == 0, evaluated.log
    assert 0 <= json.loads((cluster.folder / "client" / "metrics.json").read_text())["balanced_accuracy"] <= 1
    # the report rebuilds the paper's tables from plain fine-tune runs (sweep trials are not counted)
    tuned = cluster.skinclr("finetune", "--config", str(REPO / "experiments" / "cpu" / "baseline_scratch.yaml"),
                            "--set", f"data.root={synth_dir}", "--set", "data.image_size=32", "--set", "train.epochs=1",
                            "--set", "train.max_steps_per_epoch=2", "--set", "tracking.experiment=on-both-nodes",
                            log="finetune.log")
    assert tuned.returncode == 0, tuned.log
    reported = cluster.skinclr("report", "--experiment", "on-both-nodes", "--out",
                               str(cluster.folder / "client" / "report"), log="report.log")
    assert reported.returncode == 0, reported.log
    assert list((cluster.folder / "client" / "report").glob("*.png")), reported.log
    with cluster.client() as client:
        champion = client.get_model_version_by_alias("skinclr", "champion")
        assert champion.run_id in {r.info.run_id for r in children}

    # nothing fell back to a local store, on the nodes or on the user's machine (the synced copy
    # of the checkout holds mlruns/ with its README only)
    local = [p for p in cluster.folder.rglob("*") if p.suffix == ".db" or p.parent.name == "mlruns"]
    assert {p.name for p in local} <= {"README.md", ".gitkeep"}, local
    for node in (cluster.head, cluster.worker):
        assert not (node.home / ".cache" / "skinclr" / "checkpoints").exists()


def test_ray_job_submit_runs_the_uploaded_code_with_absolute_paths(cluster, synth_dir):
    args = sweep_args(synth_dir, "job-submit", epochs=1, samples=1)
    args[1] = str(REPO / "experiments" / "sweeps" / "finetune_asha.yaml")  # the job runs elsewhere: absolute
    done = cluster.ray("job", "submit", "--address", f"http://{HEAD}:8265", "--working-dir", ".", "--",
                       "python", "experiments/cli/submit.py", *args, log="job-submit.log", cwd=REPO)
    assert done.returncode == 0, done.log[-4000:]
    assert "succeeded" in done.log and "[sweep] best trial" in done.log
    assert_sweep_complete(cluster, "job-submit", epochs=1, samples=1)
    uploaded = list((cluster.folder / "ray").glob(
        "ray/session_*/runtime_resources/working_dir_files/*/experiments/cli/submit.py"))
    assert uploaded, "the job did not run from an uploaded copy of the working folder"


def test_the_tracking_server_gone_for_30_s_loses_and_doubles_nothing(cluster, synth_dir):
    proc = cluster.submit(*sweep_args(synth_dir, "server-outage", epochs=3, grace=3), log="outage.log")
    try:
        wait_for("a trial's first epoch", lambda: first_epoch_logged(cluster, "server-outage"), 300, proc,
                 cluster.folder / "logs" / "outage.log")
        cluster.server.stop()
        time.sleep(30)
        cluster.server.start()
        assert proc.wait(timeout=600) == 0, cluster.log("outage.log")[-4000:]
    finally:
        end(proc)
    assert_sweep_complete(cluster, "server-outage", epochs=3)


def test_a_killed_driver_resumes_with_every_epoch_logged_once(cluster, synth_dir):
    args = sweep_args(synth_dir, "driver-killed", epochs=3, grace=3)
    proc = cluster.submit(*args, log="driver-killed.log")
    try:
        wait_for("a trial's first epoch", lambda: first_epoch_logged(cluster, "driver-killed"), 300, proc,
                 cluster.folder / "logs" / "driver-killed.log")
        drivers = [p for p in cluster.head.processes("submit.py", "driver-killed") if exe(p).startswith("python")]
        assert len(drivers) == 1, drivers
        os.kill(drivers[0], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        end(proc)
    with cluster.client() as client:
        assert {r.info.status for r in sweep_runs(client, "driver-killed")[0]} == {"RUNNING"}

    resumed = cluster.submit(*args, "--resume", log="driver-resumed.log")
    try:
        assert resumed.wait(timeout=600) == 0, cluster.log("driver-resumed.log")[-4000:]
    finally:
        end(resumed)
    assert "[sweep] resuming" in cluster.log("driver-resumed.log")
    assert_sweep_complete(cluster, "driver-killed", epochs=3)


def test_a_dead_worker_node_moves_its_trial_to_the_head_from_its_checkpoint(cluster, synth_dir):
    proc = cluster.submit(*sweep_args(synth_dir, "worker-killed", epochs=3, grace=3), log="worker-killed.log")
    try:
        moved = wait_for("the worker's trial's first epoch", lambda: first_epoch_logged(cluster, "worker-killed", WORKER),
                         300, proc, cluster.folder / "logs" / "worker-killed.log")
        raylets = cluster.worker.processes("raylet", f"--node_ip_address={WORKER}")
        assert len(raylets) == 1, raylets
        os.kill(raylets[0], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, cluster.log("worker-killed.log")[-4000:]
    finally:
        end(proc)
    parent, children = assert_sweep_complete(cluster, "worker-killed", epochs=3)
    again = next(r for r in children if r.info.run_id == moved.info.run_id)
    assert again.data.tags["skinclr.node_ip"] == HEAD  # restored on the head; each epoch logged once (above)
    assert int(again.data.tags["skinclr.epochs_run"]) == 3


def test_ray_down_stops_the_head_and_a_ray_stop_on_the_worker_leaves_nothing(cluster):
    """`ray down` runs `ray stop` on the head only (Ray's local provider); a worker's raylet ends once
    the head is gone, but Ray 2.60 leaves the worker's log monitor running until `ray stop` there
    (docker/README.md says so)."""
    down = cluster.ray("down", "-y", str(cluster.config), log="ray-down.log", cwd=REPO)
    assert down.returncode == 0, down.log[-4000:]

    def left(node: SSHHost) -> list[str]:
        return [c for p in node.processes() if exe(p) not in ("sshd", "") and (c := cmdline(p))]

    def settle(done, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(2)

    settle(lambda: not left(cluster.head) and all("log_monitor.py" in c for c in left(cluster.worker)))
    assert not left(cluster.head), "\n".join(left(cluster.head))
    assert all("log_monitor.py" in c for c in left(cluster.worker)), "\n".join(left(cluster.worker))
    stopped = cluster.worker.ssh("bash -c '. ~/.skinclr-env && ray stop'", capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    settle(lambda: not left(cluster.worker), timeout=30)
    assert not left(cluster.worker), "\n".join(left(cluster.worker))
    for node in (cluster.head, cluster.worker):
        assert node.proc.poll() is None, "the machines (here: their sshd) stay up"
