"""docker-compose.yml, the Dockerfile and the compose NATS config, checked without Docker: every inferq
command parses with the real CLI, every INFERQ_* variable is a Settings field with a valid value."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.embedded import find_nats_server
from ops.cli import build_parser, build_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def _services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return compose["services"]


def _inferq_services() -> list[str]:
    return [name for name, svc in _services().items() if svc.get("command", [None])[0] == "inferq"]


def test_compose_runs_nats_a_worker_and_the_api() -> None:
    services = _services()
    assert {"nats", "worker", "api"} <= services.keys()
    assert services["worker"]["command"][:2] == ["inferq", "worker"]
    assert services["api"]["command"][:2] == ["inferq", "api"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"


@pytest.mark.parametrize("name", _inferq_services())
def test_service_command_and_env_make_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _services()[name]
    environment = service.get("environment", {})
    for key in [key for key in os.environ if key.startswith("INFERQ_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        if key.startswith("INFERQ_"):
            monkeypatch.setenv(key, str(value))
    args = build_parser().parse_args(service["command"][1:])  # argparse exits on an unknown flag
    settings = build_settings(args)
    for key in environment:
        if key.startswith("INFERQ_"):
            assert key.removeprefix("INFERQ_").lower() in type(settings).model_fields, key
    assert settings.nats_url == "nats://nats:4222"


def test_api_listens_where_compose_publishes_it() -> None:
    api = _services()["api"]
    settings = build_settings(build_parser().parse_args(api["command"][1:]))
    assert settings.host == "0.0.0.0"
    assert f"8000:{settings.port}" in api["ports"]


def test_nats_config_is_valid_for_the_real_server() -> None:
    nats = _services()["nats"]
    assert any(volume.startswith("./ops/nats/nats.conf:") for volume in nats["volumes"])
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", REPO_ROOT / "ops/nats/nats.conf"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    config = (REPO_ROOT / "ops/nats/nats.conf").read_text()
    assert re.search(r"^jetstream\s*\{", config, re.M)
    assert re.search(r"^listen:\s*0\.0\.0\.0:4222", config, re.M)


def test_dockerfile_installs_cpu_torch_first_and_runs_a_real_command() -> None:
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert "torch==" in lines[installs[0]], "torch must be installed before anything can resolve it"
    cmd = next(line for line in lines if line.startswith("CMD "))
    argv = yaml.safe_load(cmd.removeprefix("CMD "))  # the JSON exec form
    assert argv[0] == "inferq"
    build_parser().parse_args(argv[1:])
