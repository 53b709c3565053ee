"""Distributed mode against a NATS server that requires credentials: the api, workers and direct publishers
connect with what their settings say (user/password or an nkey seed file), a wrong password is a quick, clear
failure, and the per-user permissions of ops/nats/auth.conf let each role do its job and nothing more."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import nats.errors
import nkeys
import pytest

from api.app import create_app
from broker import subjects
from broker.artifacts import fetch_tokenizer
from broker.errors import BrokerUnavailable
from broker.registry import WorkerRegistry
from broker.results import read_result
from common.settings import Settings
from contracts import GenerateRequest, SamplingParams, parse_event
from tests.integration.harness import ApiServer, WorkerProcess, wait_healthy
from tests.integration.nats_cluster import NatsCluster

AUTH_CONF = Path(__file__).resolve().parents[2] / "ops" / "nats" / "auth.conf"
MODEL = "sim-secured"
PASSWORDS = {
    "api": f"api-{uuid.uuid4().hex}",
    "worker": f"worker-{uuid.uuid4().hex}",
    "publisher": f"publisher-{uuid.uuid4().hex}",
}
INBOX = {"api": "_INBOX", "worker": "_INBOX.worker", "publisher": "_INBOX.publisher"}


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    """One JetStream server with ops/nats/auth.conf's users; passwords from its environment, as in compose."""
    env = {f"NATS_{user.upper()}_PASSWORD": password for user, password in PASSWORDS.items()}
    with NatsCluster(
        tmp_path_factory.mktemp("secured"), size=1, extra_config="include ./auth.conf\n", files=[AUTH_CONF], env=env
    ) as server:
        await server.wait_for_jetstream(user="api", password=PASSWORDS["api"])
        yield server


def role_settings(server: NatsCluster, role: str, data_dir: Path, **update) -> Settings:
    return Settings(
        nats_url=server.nodes[0].url,
        nats_user=role,
        nats_password=PASSWORDS[role],
        nats_inbox_prefix=INBOX[role],
        engine="sim",
        served_model_name=MODEL,
        sim_tokens_per_s=200.0,
        max_num_seqs=4,
        queue_timeout_s=20.0,
        log_format="json",
        data_dir=data_dir,
        **update,
    )


@pytest.fixture(scope="module")
async def served(secured: NatsCluster, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiServer]:
    """A worker as user `worker` and the api as user `api`, both on the secured server."""
    data = tmp_path_factory.mktemp("secured-data")
    worker = WorkerProcess(role_settings(secured, "worker", data / "worker"), data / "worker.log").start()
    api = ApiServer(role_settings(secured, "api", data / "api")).start()
    try:
        await wait_healthy(api.base_url, worker, timeout=60)
        yield api
    finally:
        api.stop()
        worker.stop()


class Recorder:
    """A direct nats-py connection that keeps the asynchronous errors the server sends (permission violations
    arrive on the error callback, not as exceptions)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def connect(self, server: NatsCluster, role: str) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        return await nats.connect(
            server.nodes[0].url,
            user=role,
            password=PASSWORDS[role],
            inbox_prefix=INBOX[role],
            error_cb=on_error,
            allow_reconnect=False,
        )

    async def violation(self, fragment: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for error in self.errors:
                if "permissions violation" in error and fragment.lower() in error:
                    return error
            await asyncio.sleep(0.05)
        raise AssertionError(f"no permissions violation for {fragment!r}; errors: {self.errors}")


async def test_worker_and_api_serve_requests_with_their_own_users(served: ApiServer, secured: NatsCluster) -> None:
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 5})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 5
        streamed = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 5, "stream": True}
        )
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    # Everything the worker and the api did was within their permissions.
    assert "Violation" not in secured.nodes[0].log()  # the server logs "Publish/Subscription Violation - …"


async def test_publisher_queues_a_request_and_reads_its_own_stream(
    served: ApiServer, secured: NatsCluster, tmp_path: Path
) -> None:
    recorder = Recorder()
    nc = await recorder.connect(secured, "publisher")
    try:
        js = nc.jetstream()
        workers = await WorkerRegistry(await js.key_value(subjects.REGISTRY_BUCKET)).live_workers()
        assert [worker.model for worker in workers] == [MODEL]
        tokenizer_dir = await fetch_tokenizer(js, workers[0].tokenizer_object, tmp_path)
        assert any(tokenizer_dir.iterdir())

        request_id = f"pub{uuid.uuid4().hex}"
        events: asyncio.Queue = asyncio.Queue()

        async def on_event(msg) -> None:
            events.put_nowait(msg.data)

        await nc.subscribe(subjects.token_wildcard("publisher"), cb=on_event)
        request = GenerateRequest(
            request_id=request_id,
            model=MODEL,
            prompt_token_ids=[5, 6, 7],
            sampling=SamplingParams(max_tokens=4, ignore_eos=True),
            reply_subject=subjects.token_subject("publisher", request_id),
            deadline=time.time() + 30,
        )
        ack = await js.publish(
            subjects.request_subject(MODEL), request.to_bytes(), timeout=5, headers={"Nats-Msg-Id": request_id}
        )
        assert ack.stream == subjects.request_stream(MODEL)
        kinds = []
        while not kinds or kinds[-1] not in ("end", "error"):
            event = parse_event(await asyncio.wait_for(events.get(), timeout=20))
            assert event.request_id == request_id
            kinds.append(event.kind)
        assert kinds[0] == "accepted" and kinds[-1] == "end"
        assert recorder.errors == []
    finally:
        await nc.close()


async def test_publisher_is_denied_work_queues_accounts_and_other_streams(
    served: ApiServer, secured: NatsCluster
) -> None:
    recorder = Recorder()
    nc = await recorder.connect(secured, "publisher")
    try:
        await nc.subscribe("inf.req.>")  # everyone's queued requests
        await recorder.violation('subscription to "inf.req.>"')
        await nc.subscribe("inf.tok.edge-x.>")  # the token streams of an API replica
        await recorder.violation('subscription to "inf.tok.edge-x.>"')
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):  # the server drops the request
            await nc.jetstream(timeout=1).key_value(subjects.ACCOUNTS_BUCKET)
        await recorder.violation(f'publish to "$js.api.stream.info.kv_{subjects.ACCOUNTS_BUCKET}"')
        await nc.publish(f"$KV.{subjects.ACCOUNTS_BUCKET}.meta.auth_enabled", b"")  # forge the auth marker
        await recorder.violation(f'publish to "$kv.{subjects.ACCOUNTS_BUCKET}.')
    finally:
        await nc.close()


async def test_publisher_reads_back_its_own_fire_and_forget_results_only(
    served: ApiServer, secured: NatsCluster
) -> None:
    recorder = Recorder()
    nc = await recorder.connect(secured, "publisher")
    try:
        js = nc.jetstream()
        request_id = f"ff{uuid.uuid4().hex}"
        reply_subject = subjects.results_subject("publisher", request_id)
        request = GenerateRequest(
            request_id=request_id,
            model=MODEL,
            prompt_token_ids=[5, 6, 7],
            sampling=SamplingParams(max_tokens=4, ignore_eos=True),
            reply_subject=reply_subject,
        )
        await js.publish(
            subjects.request_subject(MODEL), request.to_bytes(), timeout=5, headers={"Nats-Msg-Id": request_id}
        )
        result = await read_result(js, reply_subject, wait_s=30)  # nobody listened while it ran
        assert result.finished and result.events[-1].usage.completion_tokens == 4
        assert recorder.errors == []
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):  # someone else's results
            await read_result(nc.jetstream(timeout=1), subjects.results_subject("api-edge", request_id))
        await recorder.violation("inf.results.api-edge")
    finally:
        await nc.close()


async def test_the_example_client_works_as_the_publisher_user(served: ApiServer, secured: NatsCluster) -> None:
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[2] / "examples" / "nats_client.py"
    base = [
        sys.executable,
        str(example),
        "--nats",
        secured.nodes[0].url,
        "--user",
        "publisher",
        "--inbox-prefix",
        INBOX["publisher"],
        "--client-id",
        "publisher",
    ]
    env = {**os.environ, "NATS_PASSWORD": PASSWORDS["publisher"]}  # not on the command line

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, env=env)

    live = await asyncio.to_thread(run, "--model", MODEL, "--max-tokens", "4", "--ignore-eos", "Hello")
    assert live.returncode == 0 and "4 completion tokens" in live.stderr, live.stderr
    detached = await asyncio.to_thread(run, "--model", MODEL, "--max-tokens", "4", "--ignore-eos", "--detach", "Hi")
    assert detached.returncode == 0, detached.stderr
    fetched = await asyncio.to_thread(run, "--fetch", detached.stdout.strip(), "--wait", "30")
    assert fetched.returncode == 0 and "4 completion tokens" in fetched.stderr, fetched.stderr


async def test_worker_user_cannot_read_accounts(served: ApiServer, secured: NatsCluster) -> None:
    recorder = Recorder()
    nc = await recorder.connect(secured, "worker")
    try:
        js = nc.jetstream(timeout=1)
        for call in (
            js.key_value(subjects.ACCOUNTS_BUCKET),
            js.stream_info(f"KV_{subjects.RATE_LIMIT_BUCKET}"),
            js.get_msg(f"KV_{subjects.ACCOUNTS_BUCKET}", subject=f"$KV.{subjects.ACCOUNTS_BUCKET}.>"),
        ):
            with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
                await call
        await recorder.violation(f"kv_{subjects.ACCOUNTS_BUCKET}")
        await recorder.violation(f"kv_{subjects.RATE_LIMIT_BUCKET}")
        await nc.subscribe("_INBOX.>")  # the api's replies (KV reads of accounts among them)
        await recorder.violation('subscription to "_inbox.>"')
    finally:
        await nc.close()


async def test_a_wrong_password_stops_the_worker_and_the_api_with_a_clear_error(
    secured: NatsCluster, tmp_path: Path
) -> None:
    settings = role_settings(secured, "worker", tmp_path).model_copy(update={"nats_password": "not-the-password"})
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        returncode = await asyncio.to_thread(worker.proc.wait, 30)  # raises TimeoutExpired if it hangs
        assert returncode != 0
        assert "refused" in worker.log_tail(80) and "credentials" in worker.log_tail(80)
        assert "not-the-password" not in worker.log_path.read_text()
    finally:
        worker.stop()
    app = create_app(settings.model_copy(update={"nats_user": "api"}))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="refused inferq-api-.*'s credentials"):
        async with app.router.lifespan_context(app):  # what uvicorn runs before it accepts a connection
            pass
    assert time.monotonic() - started < 10


# --- nkeys ---------------------------------------------------------------------------------------------------


def user_nkey(directory: Path, name: str) -> tuple[str, Path]:
    """A fresh user nkey: its public key (for the server) and a private seed file (for the client)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed_file = directory / f"{name}.nk"
    seed_file.touch(mode=0o600)
    seed_file.write_bytes(seed + b"\n")
    return nkeys.from_seed(bytearray(seed)).public_key.decode(), seed_file


@pytest.fixture(scope="module")
def nkey_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("nkeys")
    return {role: user_nkey(directory, role) for role in ("api", "worker")}


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory, nkey_files) -> Iterator[NatsCluster]:
    users = "\n".join(f"    {{nkey: {public}}}" for public, _ in nkey_files.values())
    with NatsCluster(
        tmp_path_factory.mktemp("nkey-server"),
        size=1,
        extra_config=f"authorization {{\n  users = [\n{users}\n  ]\n}}\n",
    ) as server:
        yield server


async def test_worker_and_api_connect_with_nkey_seed_files(
    nkey_server: NatsCluster, nkey_files, tmp_path: Path
) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # no seed: refused
        await nats.connect(nkey_server.nodes[0].url, allow_reconnect=False, max_reconnect_attempts=0)

    def settings(role: str) -> Settings:
        return Settings(
            nats_url=nkey_server.nodes[0].url,
            nats_nkey_file=nkey_files[role][1],
            engine="sim",
            served_model_name=MODEL,
            sim_tokens_per_s=200.0,
            queue_timeout_s=20.0,
            log_format="json",
            data_dir=tmp_path / role,
        )

    worker = WorkerProcess(settings("worker"), tmp_path / "worker.log").start()
    api = ApiServer(settings("api")).start()
    try:
        await wait_healthy(api.base_url, worker, timeout=60)
        async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
            response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
    finally:
        api.stop()
        worker.stop()
