"""docker/: the files parse, agree with each other and with the repository (no Docker engine here).

The Ray cluster config goes through Ray's own preparation and JSON-schema validation, the ones
`ray up` runs before it touches a machine."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def cluster(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def run_env(cfg: dict) -> dict[str, str]:
    """The cluster's environment: `--env K=V` of the containers, or the exports of ~/.skinclr-env."""
    options = " ".join(cfg.get("docker", {}).get("run_options", []))
    found = dict(re.findall(r"--env (\w+)=(\S+)", options))
    for command in cfg.get("setup_commands", []):
        if "~/.skinclr-env" in command and "printf" in command:
            fmt, *values = shlex.split(command.split("printf", 1)[1].split(">")[0])
            for name, value in re.findall(r"export (\w+)=([^\\]+)", fmt):
                found[name] = values.pop(0) if value.startswith("%s") else value
    return found


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_the_project_with_the_pinned_constraints(name):
    steps = instructions(DOCKER / name)
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "install -r constraints.txt" in runs and 'install -c constraints.txt ".[tune,server]"' in runs
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} names nothing in the repository"
    assert (DOCKER / f"{name}.dockerignore").is_file()


def test_the_cpu_image_is_python_311_slim_and_the_cuda_image_an_nvidia_runtime():
    cpu = [args for op, args in instructions(DOCKER / "Dockerfile") if op == "FROM"]
    assert cpu == ["python:3.11-slim"]
    cuda = instructions(DOCKER / "Dockerfile.cuda")
    default = dict(a.split("=", 1) for op, a in cuda if op == "ARG")["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", default)
    assert [a for op, a in cuda if op == "FROM"][-1] == "${CUDA_IMAGE}"
    assert "uv python install 3.11" in " ".join(a for op, a in cuda if op == "RUN")


def test_compose_runs_the_tracking_server_on_postgres_with_an_artifact_volume(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow"}
    pg, server = services["postgres"], services["mlflow"]
    assert pg["image"].startswith("postgres:") and "healthcheck" in pg
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"

    cmd = server["command"]
    assert cmd[:2] == ["skinclr", "server"]
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--host"] == "0.0.0.0"
    store = urlparse(flags["--backend-store-uri"])
    assert store.scheme == "postgresql+psycopg" and store.hostname == "postgres" and store.path == f"/{pg['environment']['POSTGRES_DB']}"
    assert store.username == pg["environment"]["POSTGRES_USER"]
    assert server["ports"] == [f"{flags['--port']}:{flags['--port']}"]

    mounts = dict(v.split(":")[::-1] for v in server["volumes"])
    assert mounts[flags["--artifacts-destination"]] in compose["volumes"], "artifacts must live on a named volume"
    assert pg["volumes"][0].split(":")[0] in compose["volumes"]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_pass_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster(name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_every_node_logs_to_the_tracking_server_and_keeps_sweeps_on_shared_storage(name, compose):
    env = run_env(cluster(name))
    uri = urlparse(env["MLFLOW_TRACKING_URI"])
    assert uri.scheme == "http" and f"{uri.port}:{uri.port}" in compose["services"]["mlflow"]["ports"]
    assert env["SKINCLR_SWEEP_STORAGE"].startswith("/"), "sweep storage must be one absolute path on every node"
    assert env["NO_ALBUMENTATIONS_UPDATE"] == "1"


def test_the_cloud_cluster_runs_the_cuda_image_on_gpu_workers():
    cfg = cluster("cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["cache_stopped_nodes"] is False
    docker = cfg["docker"]
    assert docker["image"].endswith("/skinclr:cuda")
    assert "--gpus all" in docker["worker_run_options"]
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert all(t["min_workers"] >= 1 for t in workers)
    storage = run_env(cfg)["SKINCLR_SWEEP_STORAGE"]
    mounted = [o.split()[1].split(":")[1] for o in docker["run_options"] if o.startswith("--volume")]
    assert any(storage.startswith(m) for m in mounted), "the sweep storage must be the mounted shared folder"
    assert any("mount" in c and "/mnt/shared" in c for c in cfg["initialization_commands"])


def test_the_local_cluster_syncs_a_slim_copy_and_puts_its_venv_on_path():
    cfg = cluster("cluster-local.yaml")
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] not in provider["worker_ips"]
    assert urlparse(run_env(cfg)["MLFLOW_TRACKING_URI"]).hostname == provider["head_ip"]
    # a slim copy, never the checkout itself (.venv); not into ~/skinclr, which would shadow the package
    assert cfg["file_mounts"] == {"~/skinclr-src": "build/cluster-src"}
    setup = " && ".join(cfg["setup_commands"])
    assert "-c ~/skinclr-src/constraints.txt" in setup and "skinclr-src[tune,server]" in setup
    assert "export PATH=%s:$PATH" in setup and ". ~/.skinclr-env' >> ~/.bashrc" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "--node-ip-address=$(echo $SSH_CONNECTION" in cfg[key][-1]
    assert "ray start --head" in cfg["head_start_ray_commands"][-1]
    assert "--address=$RAY_HEAD_IP:6379" in cfg["worker_start_ray_commands"][-1]


def test_the_readmes_submit_sweeps_with_the_submit_script():
    for readme in (REPO / "README.md", DOCKER / "README.md"):
        text = readme.read_text()
        assert "ray submit docker/cluster" in text and "experiments/cli/submit.py --" in text, readme
        assert "my_script.py" not in text and "ray exec" not in text, readme


def test_the_readme_names_only_files_and_configs_that_exist():
    text = (DOCKER / "README.md").read_text()
    paths = set(re.findall(r"\b((?:docker|experiments)/[\w./-]+\.(?:yaml|cuda|md)|docker/Dockerfile)\b", text))
    assert {"docker/cluster.yaml", "docker/cluster-local.yaml", "docker/compose.yaml", "docker/Dockerfile",
            "docker/Dockerfile.cuda"} <= paths
    for path in paths:
        assert (REPO / path).is_file(), f"docker/README.md names {path}, which does not exist"
