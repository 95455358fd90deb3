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


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_the_project_with_the_pinned_constraints(name):
    steps = instructions(DOCKER / name)
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "install -r constraints.txt" in runs and 'install -c constraints.txt ".[tune]"' in runs
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


def test_ray_cluster_passes_rays_own_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)
    head_type = prepared["head_node_type"]
    node_type = prepared["available_node_types"][head_type]
    workers = cluster["provider"]["worker_ips"]
    assert cluster["provider"]["head_ip"] not in workers
    assert node_type["min_workers"] == node_type["max_workers"] == len(workers) >= 1


def test_ray_cluster_runs_the_gpu_image_with_the_repo_and_the_tracking_server(cluster, compose):
    docker = cluster["docker"]
    assert docker["image"].endswith("/skinclr:cuda")
    options = " ".join(docker["run_options"])
    assert "--gpus all" in options
    uri = re.search(r"--env MLFLOW_TRACKING_URI=(\S+)", options).group(1)
    parsed = urlparse(uri)
    assert parsed.hostname == cluster["provider"]["head_ip"], "workers must log to the head's tracking server"
    assert f"{parsed.port}:{parsed.port}" in compose["services"]["mlflow"]["ports"]

    mounted = {k: v for k, v in cluster["file_mounts"].items() if v == "."}
    assert list(mounted) == ["~/skinclr"], "the checkout (ray up runs from the repo root) goes to ~/skinclr"
    assert any("-e ~/skinclr" in c for c in cluster["setup_commands"])
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in cluster["worker_start_ray_commands"])


def test_the_readme_names_only_files_and_configs_that_exist():
    text = (DOCKER / "README.md").read_text()
    paths = set(re.findall(r"\b((?:docker|experiments)/[\w./-]+\.(?:yaml|cuda|md)|docker/Dockerfile)\b", text))
    assert {"docker/ray-cluster.yaml", "docker/compose.yaml", "docker/Dockerfile", "docker/Dockerfile.cuda"} <= paths
    for path in paths:
        assert (REPO / path).is_file(), f"docker/README.md names {path}, which does not exist"
