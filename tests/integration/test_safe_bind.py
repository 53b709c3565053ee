"""An api on a non-loopback address never serves anonymous admins by accident: with auth `auto` and no
credential it refuses to start (exit code 78, a message saying what to set); with a key it requires the key;
`INFERQ_AUTH=off` is the explicit way out. Real `inferq api` processes bound to 0.0.0.0, reached via 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.bind_safety import is_loopback, needs_credential_check
from broker.embedded import EmbeddedNatsServer
from common.process import EXIT_CONFIG
from common.settings import Settings
from tests.integration.harness import free_port


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    # Not the session server: another test creating a key there would turn auth on for everyone.
    with EmbeddedNatsServer(tmp_path_factory.mktemp("safe-bind") / "nats") as server:
        yield server


def _start_api(nats: EmbeddedNatsServer, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log_path = tmp_path / f"api-{port}.log"
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("INFERQ_")}
    full_env |= {
        "INFERQ_HOST": "0.0.0.0",
        "INFERQ_PORT": str(port),
        "INFERQ_NATS_URL": nats.url,
        "INFERQ_DATA_DIR": str(tmp_path / "data"),
        "INFERQ_LOG_FORMAT": "json",
        **env,
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "api"], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    return proc, f"http://127.0.0.1:{port}", log_path


def _wait_serving(proc: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            httpx.get(f"{base}/version", timeout=2)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the api did not start"
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def test_no_credential_on_a_public_address_refuses_to_start(own_nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    proc, base, log_path = _start_api(own_nats, tmp_path)
    try:
        assert proc.wait(60) == EXIT_CONFIG
    finally:
        _stop(proc)
    log = log_path.read_text()
    assert "api.unsafe_bind" in log and "INFERQ_API_KEYS" in log and "INFERQ_AUTH=off" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/v1/models", timeout=2)


def test_with_a_key_on_a_public_address_the_key_is_required(own_nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    proc, base, log_path = _start_api(own_nats, tmp_path, INFERQ_API_KEYS="s3cret-admin-key")
    try:
        _wait_serving(proc, base, log_path)
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        authorized = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cret-admin-key"}, timeout=10)
        assert authorized.status_code == 200
    finally:
        _stop(proc)


def test_auth_off_is_the_explicit_way_out(own_nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    proc, base, log_path = _start_api(own_nats, tmp_path, INFERQ_AUTH="off")
    try:
        _wait_serving(proc, base, log_path)
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("api.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_only_auto_without_keys_off_loopback_is_checked() -> None:
    assert needs_credential_check(Settings(host="0.0.0.0"))
    assert not needs_credential_check(Settings(host="0.0.0.0", api_keys=["k"]))
    assert not needs_credential_check(Settings(host="0.0.0.0", auth="off"))
    assert not needs_credential_check(Settings(host="0.0.0.0", auth="on"))
    assert not needs_credential_check(Settings(host="127.0.0.1"))
