"""`inferq keys …` and `inferq users …` against the NATS the replicas use: what the CLI makes works on the API
at once, listings never show secrets, revocation and removal take effect."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.auth.cli import main as cli
from tests.integration.auth.conftest import headers

pytestmark = pytest.mark.asyncio
REPO_ROOT = Path(__file__).resolve().parents[3]


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli, list(argv))
    return code, capsys.readouterr().out


async def test_keys_create_list_revoke(api_on, auth_nats, capsys) -> None:
    code, out = await run(
        capsys, "keys", "create", "from-cli", "--role", "client", "--rpm", "2", "--nats", auth_nats.url
    )
    assert code == 0
    # Alone on its line (configured logging goes to stderr; unconfigured test logging also prints to stdout).
    [key] = [line for line in out.splitlines() if line.startswith("iq_")]
    async with httpx.AsyncClient(base_url=api_on.base_url, headers=headers(key)) as client:
        response = await client.get("/v1/models")
        assert response.status_code == 200 and response.headers["x-ratelimit-limit-requests"] == "2"
        code, listing = await run(capsys, "keys", "list", "--nats", auth_nats.url)
        assert code == 0 and "from-cli" in listing and key not in listing
        key_id = key.split("_")[1]
        assert (await run(capsys, "keys", "revoke", key_id, "--nats", auth_nats.url))[0] == 0
        assert (await client.get("/v1/models")).status_code == 401
    assert (await run(capsys, "keys", "revoke", key_id, "--nats", auth_nats.url))[0] == 1


async def test_users_add_list_remove(api_on, auth_nats, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long cli password\n"))
    assert (
        await run(
            capsys, "users", "add", "cli@example.org", "--password-stdin", "--role", "monitor", "--nats", auth_nats.url
        )
    )[0] == 0
    code, listing = await run(capsys, "users", "list", "--nats", auth_nats.url)
    assert code == 0 and "cli@example.org" in listing and "monitor" in listing
    login = {"email": "cli@example.org", "password": "a long cli password"}
    async with httpx.AsyncClient(base_url=api_on.base_url) as client:
        token = (await client.post("/users/me/token", json=login)).json()
        assert token["role"] == "monitor"
        assert (await client.get("/v1/gpu/info", headers=headers(token["token"]))).status_code == 200
        assert (await run(capsys, "users", "remove", "cli@example.org", "--nats", auth_nats.url))[0] == 0
        assert (await client.get("/v1/gpu/info", headers=headers(token["token"]))).status_code == 401
        assert (await client.post("/users/me/token", json=login)).status_code == 401


async def test_the_inferq_command_forwards_to_the_accounts_cli(auth_nats) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ops", "keys", "list", "--nats", auth_nats.url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ID")  # logs went to stderr
