"""docker-compose.yml, its configs and the Dockerfile, checked without starting containers (no image registry
here): the services and their health checks, every `inferq` command against the real CLI parser, every INFERQ_*
variable against Settings, every file mounted from the repo, the NATS configs against the real nats-server
(`-t`), and the cluster, users and load balancer wired consistently. `docker compose config` runs too when
the compose plugin is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.embedded import find_nats_server
from common.settings import Settings
from ops.cli import build_parser, build_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
NATS_DIR = REPO_ROOT / "ops" / "nats"
NATS_NODES = ("nats1", "nats2", "nats3")
PASSWORDS = {
    "NATS_API_PASSWORD": "api-secret",
    "NATS_WORKER_PASSWORD": "worker-secret",
    "NATS_PUBLISHER_PASSWORD": "publisher-secret",
}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::[?-]([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Compose's `${VAR:?message}` / `${VAR:-default}`: the test passwords, else the default."""
    if not isinstance(value, str):
        return value
    return _INTERPOLATION.sub(lambda m: PASSWORDS.get(m.group(1), m.group(2) or ""), value)


def _services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return compose["services"]


def _inferq_services() -> list[str]:
    return [name for name, svc in _services().items() if svc.get("command", [None])[0] == "inferq"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: str(_interpolate(value)) for key, value in service.get("environment", {}).items()}


def _nats_server_test(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
    )


def test_compose_runs_a_nats_cluster_workers_two_apis_and_a_load_balancer() -> None:
    services = _services()
    assert set(NATS_NODES) | {"worker", "worker-gpu", "api", "lb"} <= services.keys()
    assert services["api"]["deploy"]["replicas"] == 2
    assert "ports" not in services["api"]  # only the load balancer is published
    assert [port.split(":")[0] for port in services["lb"]["ports"]] == ["8000"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name} has no exec-form healthcheck"


def test_workers_run_on_cpu_by_default_and_on_a_reserved_gpu_in_the_gpu_profile() -> None:
    cpu, gpu = _services()["worker"], _services()["worker-gpu"]
    assert "profiles" not in cpu and _environment(cpu)["INFERQ_DEVICE"] == "cpu"
    assert gpu["profiles"] == ["gpu"] and _environment(gpu)["INFERQ_DEVICE"].startswith("cuda")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["context"] == "." and "TORCH_INDEX_URL" in gpu["build"]["args"]  # same Dockerfile


def test_every_inferq_service_and_the_nats_nodes_use_the_one_image() -> None:
    for name in [*_inferq_services(), *NATS_NODES]:
        build = _services()[name]["build"]
        assert (build if isinstance(build, str) else build["context"]) == ".", name


@pytest.mark.parametrize("name", _inferq_services())
def test_service_command_and_env_make_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _services()[name]
    environment = _environment(service)
    for key in [key for key in os.environ if key.startswith("INFERQ_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        assert key.startswith("INFERQ_"), f"{name}: {key} is not an inferq setting"
        assert key.removeprefix("INFERQ_").lower() in Settings.model_fields, key
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(service["command"][1:])  # argparse exits on an unknown command or flag
    assert args.command == service["command"][1] and callable(args.handler)
    settings = build_settings(args)
    assert settings.nats_url == ",".join(f"nats://{node}:4222" for node in NATS_NODES)
    assert settings.nats_replicas == len(NATS_NODES)
    assert settings.nats_user and settings.nats_password in PASSWORDS.values()


def test_nats_users_and_inboxes_match_the_permissions_in_auth_conf() -> None:
    auth = (NATS_DIR / "auth.conf").read_text()
    users = {name: _environment(_services()[name]) for name in ("worker", "worker-gpu", "api")}
    for name, env in users.items():
        user = env["INFERQ_NATS_USER"]
        assert re.search(rf"\{{user: {user}, password: \$NATS_{user.upper()}_PASSWORD", auth), name
        assert env["INFERQ_NATS_PASSWORD"] == PASSWORDS[f"NATS_{user.upper()}_PASSWORD"], name
        prefix = env.get("INFERQ_NATS_INBOX_PREFIX", "_INBOX")
        assert user == "api" or f'"{prefix}.>"' in auth, f"{name} may not subscribe to its inbox {prefix}"


def test_files_mounted_from_the_repo_exist() -> None:
    mounts = [
        volume.split(":")[0]
        for service in _services().values()
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    ]
    assert mounts
    for source in mounts:
        assert (REPO_ROOT / source).exists(), source


@pytest.mark.parametrize("node", NATS_NODES)
def test_each_cluster_node_config_is_valid_for_the_real_server(node: str) -> None:
    service = _services()[node]
    env = _environment(service)
    assert env["NATS_SERVER_NAME"] == node
    config = service["command"][service["command"].index("-c") + 1]
    mount = next(v for v in service["volumes"] if v.startswith("./ops/nats:"))
    local = REPO_ROOT / "ops/nats" / Path(config).relative_to(mount.split(":")[1])
    result = _nats_server_test(local, env)
    assert result.returncode == 0, result.stderr
    text = local.read_text()
    routes = re.findall(r"nats-route://(\w+):6222", text)
    assert sorted(routes) == sorted(NATS_NODES)  # every node routes to every node
    assert re.search(r"^include \./auth\.conf", text, re.M)


def test_nats_configs_refuse_to_start_without_passwords() -> None:
    result = _nats_server_test(NATS_DIR / "nats.conf", {})
    assert result.returncode != 0 and "NATS_API_PASSWORD" in result.stderr
    assert _nats_server_test(NATS_DIR / "nats.conf", PASSWORDS).returncode == 0


def test_load_balancer_proxies_to_the_api_service_with_streaming_and_websockets() -> None:
    lb = _services()["lb"]
    mount = next(v for v in lb["volumes"] if "nginx" in v)
    config = (REPO_ROOT / mount.split(":")[0]).read_text()
    api_port = build_settings(build_parser().parse_args(_services()["api"]["command"][1:])).port
    assert re.search(rf"server api:{api_port} resolve;", config)
    assert "proxy_buffering off;" in config  # SSE
    assert re.search(r"proxy_set_header Upgrade \$http_upgrade;", config)  # WebSocket
    assert re.search(r"listen 80;", config) and lb["ports"] == ["8000:80"]


def _compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or the standalone `docker-compose`, whichever is installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_accepts_the_file_and_demands_the_passwords(tmp_path: Path) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    (tmp_path / "empty.env").touch()  # not a developer's .env
    check = [
        *compose,
        "-f",
        str(REPO_ROOT / "docker-compose.yml"),
        "--env-file",
        str(tmp_path / "empty.env"),
        "config",
        "-q",
    ]
    without = {key: value for key, value in os.environ.items() if not key.startswith("NATS_")}
    result = subprocess.run(check, capture_output=True, text=True, env={**without, **PASSWORDS}, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(check, capture_output=True, text=True, env=without, cwd=REPO_ROOT)
    assert result.returncode != 0 and "NATS_" in result.stderr  # no default passwords


def test_dockerfile_installs_cpu_torch_first_and_runs_a_real_command() -> None:
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert "torch==" in lines[installs[0]], "torch must be installed before anything can resolve it"
    assert any(line.startswith("ARG TORCH_INDEX_URL") for line in lines)  # the GPU worker's build argument
    cmd = next(line for line in lines if line.startswith("CMD "))
    argv = yaml.safe_load(cmd.removeprefix("CMD "))  # the JSON exec form
    assert argv[0] == "inferq"
    build_parser().parse_args(argv[1:])
