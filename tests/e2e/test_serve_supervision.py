"""`inferq serve` (sim engine, real processes) survives its own crashes: a SIGKILLed worker, api or
nats-server is started again and the service goes on (a stream in flight completes with the same text, stored
files survive), a crash loop is given up while the rest serves, and a SIGKILLed `inferq serve` leaves no
process behind and starts again on the same data dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import free_port
from tests.json_logs import json_log_lines

pytestmark = pytest.mark.slow

MODEL = "sim"


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children_of(pid: int) -> dict[int, str]:
    """Live direct children of `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and _alive(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


class Serve:
    """`inferq serve` in its own process, logging JSON lines to a file."""

    def __init__(self, data_dir: Path, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "INFERQ_PORT": str(self.port),
            "INFERQ_DATA_DIR": str(data_dir),
            "INFERQ_ENGINE": "sim",
            "INFERQ_SIM_TOKENS_PER_S": "20",
            "INFERQ_DEPLOY_AGENT": "false",
            "INFERQ_LOG_FORMAT": "json",
            "INFERQ_RESTART_BACKOFF_INITIAL_S": "0.2",
            **env,
        }
        full_env.pop("INFERQ_NATS_URL", None)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "serve"], env=full_env, stdout=log, stderr=subprocess.STDOUT
            )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def events(self, name: str) -> list[dict]:
        return [line for line in json_log_lines(self.log_path) if line.get("event") == name]

    def answers(self) -> bool:
        """A small completion succeeds (False while the api or what it needs is down)."""
        try:
            return _complete(self.base).status_code == 200
        except httpx.TransportError:
            return False

    def wait_healthy(self, timeout_s: float = 90) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, self.tail()
            try:
                return httpx.get(f"{self.base}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait_until(healthy, timeout_s, "inferq serve to be healthy")

    def child(self, marker: str) -> int:
        """The pid of the one child whose command line contains `marker`."""
        matches = [pid for pid, cmdline in _children_of(self.proc.pid).items() if marker in cmdline]
        assert len(matches) == 1, (marker, _children_of(self.proc.pid))
        return matches[0]

    def kill_child(self, marker: str) -> int:
        pid = self.child(marker)
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarts(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return {
            sample.labels["process"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "inferq:process_restarts_total"
        }

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(**env: str) -> Serve:
        serve = Serve(tmp_path / "data", tmp_path / "serve.log", **env)
        started.append(serve)
        return serve

    yield start
    for serve in started:
        serve.stop()


def _stream_text(base: str, body: dict, on_chunk: Callable[[int], None] = lambda _: None) -> str:
    """The streamed completion's text; `on_chunk(n)` runs after the n-th text chunk."""
    text, chunks = "", 0
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            delta = event["choices"][0]["text"] if event.get("choices") else ""
            if delta:
                text += delta
                chunks += 1
                on_chunk(chunks)
    return text


def _complete(base: str, prompt: str = "w1 w2", max_tokens: int = 4) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def test_a_sigkilled_worker_is_restarted_and_the_stream_completes_with_the_same_text(start_serve) -> None:
    serve = start_serve()
    serve.wait_healthy()
    body = {"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    undisturbed = _stream_text(serve.base, body)
    killed: list[int] = []

    def kill_worker_once(chunks: int) -> None:
        if chunks == 15 and not killed:
            killed.append(serve.kill_child("ops.cli worker"))

    assert _stream_text(serve.base, body, kill_worker_once) == undisturbed
    assert killed and not _alive(killed[0])
    restarted = serve.events("child.restarted")
    assert [event["child"] for event in restarted] == ["worker"]
    assert serve.child("ops.cli worker") != killed[0]
    assert serve.restarts()["worker"] == 1
    assert serve.stop() == 0


def test_a_sigkilled_api_is_restarted(start_serve) -> None:
    serve = start_serve()
    serve.wait_healthy()
    killed = serve.kill_child("ops.cli api")
    _wait_until(serve.answers, 60, "the restarted api to answer")
    assert serve.child("ops.cli api") != killed
    assert serve.restarts()["api"] == 1
    assert serve.stop() == 0


def test_a_sigkilled_nats_server_is_restarted_on_its_store(start_serve) -> None:
    serve = start_serve()
    serve.wait_healthy()
    content = b"".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": MODEL, "prompt": "w1", "max_tokens": 2},
            }
        ).encode()
        + b"\n"
        for i in range(3)
    )
    upload = httpx.post(
        f"{serve.base}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, timeout=30
    )
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]
    serve.kill_child("nats-server")

    _wait_until(lambda: serve.events("child.restarted"), 30, "nats-server to be restarted")
    assert serve.events("child.restarted")[0]["child"] == "nats-server"

    _wait_until(serve.answers, 60, "the api and the worker to serve again through the restarted server")
    stored = httpx.get(f"{serve.base}/v1/files/{file_id}/content", timeout=30)
    assert stored.status_code == 200 and stored.content == content
    assert serve.restarts()["nats-server"] == 1
    assert serve.stop() == 0


def test_a_crash_looping_worker_is_given_up_while_the_api_serves(start_serve) -> None:
    # A request that arrives while the catalog still lists the dead worker (its registry entry lives out its TTL,
    # the catalog keeps the last fleet a TTL longer against a KV failover) is queued and waits the queue timeout;
    # a short one gives it the same 503 no_worker well within the client's timeout (CI once took 60 s here).
    serve = start_serve(INFERQ_CRASH_LOOP_CRASHES="3", INFERQ_REGISTRY_TTL_S="2", INFERQ_QUEUE_TIMEOUT_S="5")
    serve.wait_healthy()
    for crash in range(3):
        if crash:
            _wait_until(lambda n=crash: len(serve.events("child.restarted")) >= n, 30, "the worker's restart")
        serve.kill_child("ops.cli worker")
    _wait_until(lambda: serve.events("child.gave_up"), 30, "the launcher to give up")
    gave_up = serve.events("child.gave_up")[0]
    assert gave_up["child"] == "worker" and "crash loop" in gave_up["reason"]
    time.sleep(1.0)
    assert serve.proc.poll() is None  # still serving
    assert not any("ops.cli worker" in cmd for cmd in _children_of(serve.proc.pid).values())

    def no_worker() -> bool:
        reply = _complete(serve.base)
        return reply.status_code == 503 and reply.json()["error"]["code"] == "no_worker"

    _wait_until(no_worker, 30, "requests for the dead model to get 503 no_worker")
    assert httpx.get(f"{serve.base}/v1/models", timeout=10).status_code == 200  # the api still answers
    text = httpx.get(f"{serve.base}/metrics", timeout=10).text
    assert 'inferq:process_given_up{process="worker"} 1.0' in text
    assert serve.stop() == 0


def test_a_sigkilled_serve_leaves_no_orphans_and_starts_again_on_its_data_dir(start_serve) -> None:
    serve = start_serve()
    serve.wait_healthy()
    children = list(_children_of(serve.proc.pid))
    assert len(children) == 3, _children_of(serve.proc.pid)  # nats-server, worker, api
    serve.proc.kill()
    serve.proc.wait()
    _wait_until(lambda: not any(map(_alive, children)), 15, "the children to die with inferq serve")

    again = start_serve()
    again.wait_healthy()
    assert _complete(again.base).status_code == 200
    assert again.stop() == 0


def test_sigterm_stops_everything_quickly(start_serve) -> None:
    serve = start_serve()
    serve.wait_healthy()
    children = list(_children_of(serve.proc.pid))
    stream_done = threading.Event()

    def stream() -> None:  # a request in flight must not hold up the stop
        try:
            _stream_text(serve.base, {"model": MODEL, "prompt": "w1", "max_tokens": 2000, "ignore_eos": True})
        except (httpx.HTTPError, AssertionError):
            pass
        stream_done.set()

    threading.Thread(target=stream, daemon=True).start()
    time.sleep(1.0)
    started = time.monotonic()
    assert serve.stop() == 0
    assert time.monotonic() - started < 15  # 10 s for all children together, not 10 s each
    assert not any(map(_alive, children))


def test_serve_on_a_public_address_without_a_credential_refuses_at_once(start_serve) -> None:
    serve = start_serve(INFERQ_HOST="0.0.0.0")
    assert serve.proc.wait(90) == 1, serve.tail()
    assert "api.unsafe_bind" in serve.tail() or "api.unsafe_bind" in serve.log_path.read_text()
    gave_up = serve.events("child.gave_up")
    assert [event["child"] for event in gave_up] == ["api"] and "configuration" in gave_up[0]["reason"]
    assert serve.events("child.restarted") == []  # a refusal is not retried
