"""Deployments over SSH against a real OpenSSH server on 127.0.0.1 (its own config, host key and port) logging in
as a dedicated test user, with a password and with a key: the happy path up to `active` and back to `stopped`,
and the failures a user must be told about (wrong password, no inferq on the host, a model the worker cannot
load). Secrets must appear in no KV record, log line or stream message."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import httpx
import pytest
import structlog
from nats.js import JetStreamContext

from broker import subjects
from broker.connection import connect
from common.settings import Settings
from tests.integration import test_deployments as local
from tests.integration.harness import ApiServer, free_port
from tests.integration.test_deployments import gone, log_contents, read_events, running_agent, wait_status

# The module fixtures of the local deployment tests (their own nats-server, an api with auth off), shared here.
deploy_nats, deploy_settings, deploy_api = local.deploy_nats, local.deploy_settings, local.deploy_api

SSHD = Path("/usr/sbin/sshd")
USER = "inferqdeploy"
INFERQ = str(Path(sys.executable).with_name("inferq"))

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not SSHD.exists(), reason="needs OpenSSH's sshd (apt-get install openssh-server; CI does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating the SSH test user needs root"),
]


@dataclass(frozen=True)
class SshServer:
    port: int
    password: str
    private_key: str  # OpenSSH private key text
    known_hosts: Path

    def config(self, **overrides) -> dict:
        return {"host": "127.0.0.1", "username": USER, "port": self.port, **overrides}


@contextmanager
def traversable_by_others(*targets: Path) -> Iterator[None]:
    """The test user runs this venv's `inferq`, whose interpreter may sit under a private home (pyenv in /root):
    let others traverse (not list) the directories above it while the tests run, and restore them after."""
    changed: dict[Path, int] = {}
    for target in targets:
        for directory in Path(os.path.realpath(target)).parents:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH and directory not in changed:
                changed[directory] = mode
                os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for directory, mode in changed.items():
            os.chmod(directory, stat.S_IMODE(mode))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    home = tmp_path_factory.mktemp("sshd")
    os.chmod(home, 0o755)
    created_user = subprocess.run(["id", USER], capture_output=True).returncode != 0
    if created_user:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    password = secrets.token_urlsafe(18)
    subprocess.run(["chpasswd"], input=f"{USER}:{password}", text=True, check=True)
    host_key = home / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    keys_dir = home / "authorized_keys"
    keys_dir.mkdir()
    (keys_dir / USER).write_bytes(user_key.export_public_key())
    os.chmod(keys_dir / USER, 0o644)
    port = free_port()
    config = home / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {home}/sshd.pid\n"
        f"AuthorizedKeysFile {keys_dir}/%u\nUsePAM no\nStrictModes no\nPasswordAuthentication yes\n"
        f"KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin no\nAllowUsers {USER}\n"
    )
    known_hosts = home / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {(host_key.with_suffix('.pub')).read_text()}")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    stack = ExitStack()
    log = open(home / "sshd.log", "wb")
    server = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config), "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        # … and the authorized keys, which sshd reads as the user
        stack.enter_context(traversable_by_others(Path(sys.executable), Path(INFERQ), keys_dir / USER))
        deadline = time.monotonic() + 10
        while True:
            assert server.poll() is None, (home / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not listen"
                time.sleep(0.05)
        yield SshServer(port, password, user_key.export_private_key().decode(), known_hosts)
    finally:
        stack.close()
        server.terminate()
        server.wait(10)
        log.close()
        if created_user:
            subprocess.run(["userdel", "--remove", USER], capture_output=True)


def agent_settings(settings: Settings, **changes) -> Settings:
    return settings.model_copy(update={"deploy_remote_inferq": INFERQ, **changes})


async def deploy(client: httpx.AsyncClient, model_id: str, ssh_config: dict) -> str:
    response = await client.post(
        "/api/v1/deploy", json={"model_id": model_id, "user_id": "u1", "api_name": "ssh", "ssh_config": ssh_config}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued"
    return response.json()["deployment_id"]


async def stored_bytes(settings: Settings, deployment_id: str) -> bytes:
    """Every stored revision of the record and every kept log message of the deployment."""
    async with connect(settings.nats_url, name="test-grep") as nc:
        js = nc.jetstream()
        record = f"$KV.{subjects.DEPLOYMENTS_BUCKET}.{subjects.deployment_key(deployment_id)}"
        revisions = await stored_messages(js, f"KV_{subjects.DEPLOYMENTS_BUCKET}", record)
        assert revisions, "the deployment's record is stored"  # so the grep below cannot pass on nothing
        logs = await stored_messages(js, subjects.DEPLOY_LOG_STREAM, subjects.deploy_log_subject(deployment_id))
    return b"\n".join(revisions + logs)


async def stored_messages(js: JetStreamContext, stream: str, subject: str) -> list[bytes]:
    """Every message `stream` holds on `subject`, as many as the stream's own count says. (nats-py's
    `KeyValue.history` decides "no keys" from a consumer-info read that races the first delivery: it failed
    once in CI on a record that was there.)"""
    info = await js.stream_info(stream, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        return [(await sub.next_msg(timeout=5)).data for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def test_password_login_goes_active_streams_remote_logs_and_stops(
    sshd: SshServer, deploy_api: ApiServer, deploy_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = agent_settings(deploy_settings, deploy_ssh_known_hosts=sshd.known_hosts)  # host key verified
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events_logged:
        async with running_agent(settings), httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
            deployment_id = await deploy(client, "sim-over-ssh", sshd.config(password=sshd.password))
            status = await wait_status(client, deployment_id, {"active"})
            assert status["host"] == socket.gethostname() and status["container_id"].startswith("w")
            events = await read_events(
                client,
                deployment_id,
                lambda seen: any("[agent] active" in data.get("content", "") for _, data in seen),
                params={"timestamps": "true"},
            )
            metadata = next(data for name, data in events if name == "metadata")
            assert metadata["is_running"] is True and metadata["cpu_usage"].endswith("%")
            remote_pid = metadata["pid"]
            assert (
                await client.post("/v1/completions", json={"model": "sim-over-ssh", "prompt": "w7", "max_tokens": 2})
            ).status_code == 200
            contents = log_contents(events)
            assert (
                contents[0] == f"[agent] starting: {INFERQ} worker --model sim-over-ssh --engine sim --nats "
                f"{deploy_settings.nats_url} --log-format json --served-model-name sim-over-ssh"
            )
            assert any('"worker' in line for line in contents[1:])  # the remote worker's own log lines
            stopped = await client.delete(f"/api/v1/deployments/{deployment_id}")
            assert stopped.json()["status"] == "stopped"
            assert gone(remote_pid)
            final = await client.get(f"/api/v1/deployments/{deployment_id}/status")
            assert "password" not in final.text
    stored = await stored_bytes(deploy_settings, deployment_id)
    assert b"sim-over-ssh" in stored  # the grep reads real content …
    assert sshd.password.encode() not in stored  # … and no secret is in it
    rendered = repr(events_logged) + "\n".join(record.getMessage() for record in caplog.records)
    assert "ssh.connecting" in rendered
    assert sshd.password not in rendered


async def test_key_login_goes_active(
    sshd: SshServer, deploy_api: ApiServer, deploy_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key_body = sshd.private_key.splitlines()[2]  # a line of the key material itself
    with structlog.testing.capture_logs() as events_logged:
        async with (
            running_agent(agent_settings(deploy_settings)),
            httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client,
        ):
            deployment_id = await deploy(client, "sim-key-login", sshd.config(private_key=sshd.private_key))
            await wait_status(client, deployment_id, {"active"})
            assert (await client.delete(f"/api/v1/deployments/{deployment_id}")).json()["status"] == "stopped"
    assert key_body.encode() not in await stored_bytes(deploy_settings, deployment_id)
    assert key_body not in repr(events_logged) + "\n".join(record.getMessage() for record in caplog.records)


async def test_a_wrong_password_fails_with_an_authentication_reason(
    sshd: SshServer, deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    async with (
        running_agent(agent_settings(deploy_settings)),
        httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client,
    ):
        deployment_id = await deploy(client, "sim-wrong-password", sshd.config(password="not-the-password"))
        status = await wait_status(client, deployment_id, {"failed"})
    assert status["error"] == f"SSH authentication failed for {USER}@127.0.0.1:{sshd.port}"


async def test_a_host_without_inferq_fails_with_inferq_not_found(
    sshd: SshServer, deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    settings = agent_settings(deploy_settings, deploy_remote_inferq="/opt/nowhere/bin/inferq")
    async with running_agent(settings), httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
        deployment_id = await deploy(client, "sim-no-inferq", sshd.config(password=sshd.password))
        status = await wait_status(client, deployment_id, {"failed"})
    assert status["error"].startswith("inferq not found on 127.0.0.1 ('/opt/nowhere/bin/inferq')")


async def test_a_model_the_remote_worker_cannot_load_fails_with_its_error(
    sshd: SshServer, deploy_api: ApiServer, deploy_settings: Settings
) -> None:
    settings = agent_settings(deploy_settings, engine="torch")  # the real loader, which fails before torch loads
    async with running_agent(settings), httpx.AsyncClient(base_url=deploy_api.base_url, timeout=60) as client:
        deployment_id = await deploy(client, "/nonexistent/remote-model.gguf", sshd.config(password=sshd.password))
        status = await wait_status(client, deployment_id, {"failed"})
    assert status["error"].startswith("the worker exited with code 1: ")
    assert "model path '/nonexistent/remote-model.gguf' does not exist" in status["error"]
