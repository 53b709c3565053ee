"""`inferq serve` supervision: order, readiness, shutdown, a child's death, signals, no orphans. Stand-in
children (tests/ops/stand_in_child.py) replace the worker and the api; the last test runs the real ones."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from common.settings import Settings
from ops.launcher import ChildSpec, Launcher, child_env, curl_example, settings_env
from tests.json_logs import json_log_lines, non_json_lines
from tests.ops.stand_in_serve import CHILD, has_started, recorded, stand_in_children

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER_VAR = "STAND_IN_MARKER"
Logs = list[dict[str, Any]]


# --- helpers ------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, merely not reaped yet


def _marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries our marker: the launcher's whole tree, wherever it went."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _events(log_path: Path) -> list[dict[str, Any]]:
    return [line for line in json_log_lines(log_path) if "event" in line]


def _event_names(log_path: Path) -> list[str]:
    return [event["event"] for event in _events(log_path)]


def _stop_when(predicate: Callable[[], bool], launcher: Launcher) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 30
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        launcher.request_stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _assert_started_then_stopped_in_reverse(record: Path) -> None:
    # Spawn order is in the launcher's log; which child gets to write its "start" line first is a race.
    lines = recorded(record)
    assert sorted(lines[:2]) == ["start:api", "start:worker"]
    assert lines[2:] == ["stop:api", "stop:worker"]


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every structlog event, whatever level or renderer an earlier test configured (capture_logs keeps the
    configured level filter, so it would miss info events after a test set "warning")."""
    previous = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**previous)


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "record.txt"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", log_format="json")


class ServeProcess:
    """A launcher in its own process (so it can be signalled and killed), logging JSON lines to a file."""

    def __init__(self, argv: list[str], tmp_path: Path, env: dict[str, str]) -> None:
        self.marker = uuid.uuid4().hex
        self.log_path = tmp_path / "serve.log"
        full_env = {**os.environ, **env, MARKER_VAR: self.marker}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def wait_for(self, event: str, timeout_s: float) -> dict[str, Any]:
        def seen() -> bool:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"launcher exited ({self.proc.returncode}) before {event}:\n{tail}")
            return event in _event_names(self.log_path)

        _wait_until(seen, timeout_s, event)
        return next(e for e in _events(self.log_path) if e["event"] == event)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


StartServe = Callable[..., ServeProcess]


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[StartServe]:
    started: list[ServeProcess] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> ServeProcess:
        argv = [sys.executable, "-m", "tests.ops.stand_in_serve", str(tmp_path / "record.txt"), *extra]
        process = ServeProcess(argv, tmp_path, {"INFERQ_DATA_DIR": str(tmp_path / "data"), **(env or {})})
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


# --- settings travel to the children ------------------------------------------------------------------------


def test_settings_env_reproduces_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        data_dir=tmp_path,
        nats_url="nats://127.0.0.1:4333",
        api_keys=["k1", "k2"],
        port=8123,
        dtype="float32",
        max_model_len=256,
        queue_max_age_s=12.5,
    )
    env = settings_env(original)
    assert env["INFERQ_API_KEYS"] == "k1,k2"
    assert "INFERQ_EDGE_ID" not in env  # None stays unset
    for key in [key for key in os.environ if key.startswith("INFERQ_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


def test_child_env_drops_inherited_inferq_variables(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    env = child_env(settings, base={"PATH": "/bin", "INFERQ_EDGE_ID": "stale", "INFERQ_PORT": "1"})
    assert env["PATH"] == "/bin"
    assert "INFERQ_EDGE_ID" not in env
    assert env["INFERQ_PORT"] == str(settings.port)


def test_curl_example_is_pasteable() -> None:
    line = curl_example("http://127.0.0.1:8000", "tiny", auth=True)
    assert line.startswith("curl -s http://127.0.0.1:8000/v1/chat/completions ")
    body = line.split(" -d '", 1)[1].rstrip("'")
    assert json.loads(body)["model"] == "tiny"
    assert '"Authorization: Bearer $INFERQ_API_KEY"' in line


# --- supervision, in this process ---------------------------------------------------------------------------


def test_starts_in_order_and_stops_in_reverse_with_nats_last(settings: Settings, record: Path, logs: Logs) -> None:
    launcher = Launcher(settings, stand_in_children(record))
    _stop_when(lambda: has_started(record, "api"), launcher)
    assert launcher.run() == 0
    _assert_started_then_stopped_in_reverse(record)
    events = [(log["event"], log.get("child")) for log in logs]
    started_nats = next(log for log in logs if log["event"] == "nats.started")
    assert events.index(("nats.started", None)) < events.index(("child.started", "worker"))
    assert events.index(("child.started", "worker")) < events.index(("child.started", "api"))
    assert events.index(("serve.ready", None)) < events.index(("child.stopped", "api"))
    assert events.index(("child.stopped", "api")) < events.index(("child.stopped", "worker"))
    assert events[-1] == ("nats.stopped", None)
    assert any(log["event"].startswith("curl -s http://127.0.0.1:") for log in logs)
    # Both children saw the embedded server's URL and the very same settings.
    for name in ("worker", "api"):
        env = json.loads(record.with_name(f"{name}.env.json").read_text())
        assert env["INFERQ_NATS_URL"] == started_nats["url"]
        status_file = settings.data_dir / "supervisor.json"
        resolved = settings.model_copy(update={"nats_url": started_nats["url"], "supervisor_status_file": status_file})
        assert env == settings_env(resolved)


def test_given_nats_url_means_no_embedded_server(tmp_path: Path, record: Path, logs: Logs) -> None:
    settings = Settings(data_dir=tmp_path, nats_url="nats://10.0.0.1:4222")
    launcher = Launcher(settings, stand_in_children(record))
    _stop_when(lambda: has_started(record, "api"), launcher)
    assert launcher.run() == 0
    assert not any(log["event"].startswith("nats.") for log in logs)
    assert not (tmp_path / "nats").exists()
    assert json.loads(record.with_name("api.env.json").read_text())["INFERQ_NATS_URL"] == "nats://10.0.0.1:4222"


def _status(settings: Settings) -> dict[str, dict[str, Any]]:
    record = json.loads((settings.data_dir / "supervisor.json").read_text())
    return {process["name"]: process for process in record["processes"]}


def test_a_dying_child_is_restarted_with_backoff(settings: Settings, record: Path, logs: Logs) -> None:
    dying_worker = stand_in_children(record, worker=["--die-after", "0.5", "--exit-code", "7"])
    launcher = Launcher(settings, dying_worker)
    _stop_when(lambda: recorded(record).count("start:worker") >= 2, launcher)
    assert launcher.run() == 0
    died = next(log for log in logs if log["event"] == "child.died")
    assert (died["child"], died["returncode"]) == ("worker", 7)
    scheduled = next(log for log in logs if log["event"] == "child.restart_scheduled")
    assert scheduled["delay_s"] == settings.restart_backoff_initial_s
    restarted = next(log for log in logs if log["event"] == "child.restarted")
    assert (restarted["child"], restarted["restarts"]) == ("worker", 1)
    assert recorded(record).count("start:api") == 1  # the others were left alone
    assert _status(settings)["worker"]["restarts"] >= 1
    assert _status(settings)["api"] == {"name": "api", "state": "running", "restarts": 0}


def test_a_crashed_childs_leftovers_are_swept_before_its_restart(settings: Settings, record: Path) -> None:
    launcher = Launcher(settings, stand_in_children(record, worker=["--grandchild", "--die-after", "0.5"]))
    first_grandchild_dead = threading.Event()

    def watch() -> None:
        try:
            _wait_until(lambda: recorded(record).count("start:worker") >= 2, 30, "the worker's restart")
            first = int(next(line for line in recorded(record) if line.startswith("grandchild:")).rsplit(":", 1)[1])
            _wait_until(lambda: not _alive(first), 5, "the crashed worker's grandchild to be swept")
            first_grandchild_dead.set()
        finally:
            launcher.request_stop()

    threading.Thread(target=watch, daemon=True).start()
    assert launcher.run() == 0
    assert first_grandchild_dead.is_set()


def test_a_crash_looping_worker_is_given_up_while_the_api_keeps_running(
    tmp_path: Path, record: Path, logs: Logs
) -> None:
    settings = Settings(data_dir=tmp_path / "data", restart_backoff_initial_s=0.05, crash_loop_crashes=3)
    crashing = stand_in_children(record, worker=["--die-after", "0.1"])
    launcher = Launcher(settings, crashing)
    _stop_when(lambda: any(log["event"] == "child.gave_up" for log in logs), launcher)
    assert launcher.run() == 0  # ended by our stop, not by the give-up
    gave_up = next(log for log in logs if log["event"] == "child.gave_up")
    assert gave_up["child"] == "worker" and "crash loop" in gave_up["reason"]
    assert gave_up["log_level"] == "critical"
    assert recorded(record).count("start:worker") == 3  # the first run and two restarts, then no more
    assert "stop:api" in recorded(record)  # the api ran until we stopped it
    status = _status(settings)
    assert status["worker"]["state"] == "gave_up" and status["worker"]["restarts"] == 2
    assert status["api"]["state"] == "running"


def test_a_crash_looping_api_stops_the_service(tmp_path: Path, record: Path, logs: Logs) -> None:
    settings = Settings(data_dir=tmp_path / "data", restart_backoff_initial_s=0.05, crash_loop_crashes=2)
    launcher = Launcher(settings, stand_in_children(record, api=["--die-after", "0.3"]))
    assert launcher.run() == 1
    assert next(log for log in logs if log["event"] == "child.gave_up")["child"] == "api"
    assert "stop:worker" in recorded(record)  # the survivor was stopped, not abandoned
    assert logs[-1]["event"] == "nats.stopped"


def test_a_configuration_refusal_is_not_retried(settings: Settings, record: Path, logs: Logs) -> None:
    refusing = stand_in_children(record, worker=["--die-after", "0.1", "--exit-code", "78"])
    launcher = Launcher(settings, refusing)
    _stop_when(lambda: any(log["event"] == "child.gave_up" for log in logs), launcher)
    launcher.run()
    assert recorded(record).count("start:worker") == 1
    assert "configuration" in next(log for log in logs if log["event"] == "child.gave_up")["reason"]


def test_a_child_crash_looping_before_ready_fails_fast(tmp_path: Path, record: Path, logs: Logs) -> None:
    settings = Settings(data_dir=tmp_path / "data", restart_backoff_initial_s=0.05, crash_loop_crashes=3)
    never_ready = stand_in_children(record, worker=["--die-after", "0.3"])

    def build(s: Settings) -> list[ChildSpec]:
        worker, api = never_ready(s)
        return [worker, ChildSpec(api.name, api.argv, api.env, ready_check=lambda: False)]

    started = time.monotonic()
    assert Launcher(settings, build, ready_timeout_s=60).run() == 1
    assert time.monotonic() - started < 15
    assert "serve.ready" not in [log["event"] for log in logs]
    assert next(log for log in logs if log["event"] == "serve.not_ready")["given_up"] == ["worker"]


def test_not_ready_in_time_exits_1(settings: Settings, record: Path, logs: Logs) -> None:
    marker = uuid.uuid4().hex

    def build(s: Settings) -> list[ChildSpec]:
        env = {**child_env(s), MARKER_VAR: marker}
        argv = [sys.executable, str(CHILD), "api", str(record)]
        return [ChildSpec("api", argv, env, ready_check=lambda: False)]

    assert Launcher(settings, build, ready_timeout_s=0.5).run() == 1
    not_ready = next(log for log in logs if log["event"] == "serve.not_ready")
    assert not_ready["waiting_for"] == ["api"]
    # Stopped, not abandoned (on a busy machine it may not have got as far as noting its start, or its stop).
    assert _marked_processes(marker) == []


def test_a_child_ignoring_sigterm_is_killed(settings: Settings, record: Path, logs: Logs) -> None:
    launcher = Launcher(settings, stand_in_children(record, worker=["--ignore-term"]), stop_timeout_s=0.5)
    _stop_when(lambda: has_started(record, "api"), launcher)
    assert launcher.run() == 0
    stopped = {log["child"]: log["returncode"] for log in logs if log["event"] == "child.stopped"}
    assert stopped == {"api": 0, "worker": -signal.SIGKILL}


def test_grandchildren_are_stopped_with_their_parent(settings: Settings, record: Path) -> None:
    launcher = Launcher(settings, stand_in_children(record, worker=["--grandchild"]))
    _stop_when(lambda: has_started(record, "api"), launcher)
    assert launcher.run() == 0
    line = next(line for line in recorded(record) if line.startswith("grandchild:"))
    grandchild = int(line.rsplit(":", 1)[1])
    _wait_until(lambda: not _alive(grandchild), 5, "the grandchild to die")


def test_missing_child_binary_exits_1(settings: Settings, logs: Logs) -> None:
    def build(s: Settings) -> list[ChildSpec]:
        return [ChildSpec("worker", ["/nonexistent/inferq-worker"], child_env(s))]

    assert Launcher(settings, build).run() == 1
    assert any(log["event"] == "serve.failed" for log in logs)
    assert logs[-1]["event"] == "nats.stopped"


# --- the launcher as its own process: signals and SIGKILL ---------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything_and_exits_0(serve_process: StartServe, sig: int, record: Path) -> None:
    serve = serve_process()
    serve.wait_for("serve.ready", 30)
    assert len(_marked_processes(serve.marker)) == 4  # launcher, nats-server, worker, api
    serve.proc.send_signal(sig)
    assert serve.proc.wait(timeout=30) == 0
    _assert_started_then_stopped_in_reverse(record)
    assert _event_names(serve.log_path)[-1] == "nats.stopped"
    assert _marked_processes(serve.marker) == []


def test_a_crash_looping_api_makes_the_launcher_exit_nonzero(serve_process: StartServe) -> None:
    serve = serve_process(
        "--api", "--die-after 0.5", env={"INFERQ_RESTART_BACKOFF_INITIAL_S": "0.05", "INFERQ_CRASH_LOOP_CRASHES": "2"}
    )
    assert serve.proc.wait(timeout=30) == 1
    assert "child.gave_up" in _event_names(serve.log_path)
    assert "child.died" in _event_names(serve.log_path)
    assert _marked_processes(serve.marker) == []


def test_sigkilled_launcher_leaves_no_orphans(serve_process: StartServe) -> None:
    serve = serve_process()
    serve.wait_for("serve.ready", 30)
    assert len(_marked_processes(serve.marker)) == 4
    serve.proc.kill()
    serve.proc.wait()
    _wait_until(lambda: _marked_processes(serve.marker) == [], 10, "children to die with the launcher")


# --- the real thing -----------------------------------------------------------------------------------------


def _real_children_exist() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("api.main", "engine_worker.main"))


@pytest.mark.skipif(not _real_children_exist(), reason="api.main / engine_worker.main not written yet")
def test_inferq_serve_answers_a_chat_completion(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = _free_port()
    flags = f"--port {port} --device cpu --dtype float32 --max-num-seqs 4 --torch-threads 1 --log-format json"
    argv = [sys.executable, "-m", "ops.cli", "serve", *flags.split()]
    env = {"INFERQ_MODEL": str(tiny_model_dir), "INFERQ_DATA_DIR": str(tmp_path / "data")}
    serve = ServeProcess(argv, tmp_path, env)
    try:
        ready = serve.wait_for("serve.ready", 240)
        assert ready["url"] == f"http://127.0.0.1:{port}"
        assert any(name.startswith("curl -s ") for name in _event_names(serve.log_path))
        response = httpx.post(
            f"{ready['url']}/v1/chat/completions",
            json={"model": ready["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=60) == 0
        _wait_until(lambda: _marked_processes(serve.marker) == [], 10, "no process left behind")
        # --log-format json: every line is one JSON object a log shipper can read (transformers' weight-loading
        # progress bar once wrote its carriage-return frames into the worker's log)
        assert non_json_lines(serve.log_path) == []
    finally:
        serve.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_starts_one_worker_per_model() -> None:
    from ops.cli import build_parser, build_settings
    from ops.launcher import build_children

    args = build_parser().parse_args(
        ["serve", "--model", "SmolLM2-135M-Instruct", "--model", "all-MiniLM-L6-v2", "--served-model-name", "ignored"]
    )
    children = build_children(build_settings(args))
    workers = [child for child in children if child.name.startswith("worker")]
    assert [child.env["INFERQ_MODEL"] for child in workers] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    assert all("INFERQ_SERVED_MODEL_NAME" not in child.env for child in workers)
    assert children[-1].name == "api"


def test_serve_starts_workers_per_model_sharing_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from ops.cli import build_parser, build_settings
    from ops.launcher import build_children

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(9)))
    args = build_parser().parse_args(["serve", "--model", "a", "--model", "b", "--workers-per-model", "2"])
    workers = [child for child in build_children(build_settings(args)) if child.name.startswith("worker")]
    assert [child.env["INFERQ_MODEL"] for child in workers] == ["a", "a", "b", "b"]
    assert len({child.name for child in workers}) == 4
    assert {child.env["INFERQ_TORCH_THREADS"] for child in workers} == {"2"}  # 8 cores left, split four ways


def _worker_threads(*argv: str) -> set[str]:
    from ops.cli import build_parser, build_settings
    from ops.launcher import build_children

    children = build_children(build_settings(build_parser().parse_args(["serve", *argv])))
    return {child.env["INFERQ_TORCH_THREADS"] for child in children if child.name.startswith("worker")}


def test_serve_leaves_a_core_to_the_api_and_nats_unless_threads_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert _worker_threads("--model", "m") == {"7"}
    assert _worker_threads("--model", "a", "--model", "b") == {"3"}  # the 7 cores split between two workers
    assert _worker_threads("--model", "m", "--torch-threads", "2") == {"2"}
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert _worker_threads("--model", "m") == {"1"}


def _small_step_threads(*argv: str) -> set[str | None]:
    from ops.cli import build_parser, build_settings
    from ops.launcher import build_children

    children = build_children(build_settings(build_parser().parse_args(["serve", *argv])))
    return {child.env.get("INFERQ_SMALL_STEP_THREADS") for child in children if child.name.startswith("worker")}


def test_a_lone_worker_decodes_a_few_sequences_on_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERQ_SMALL_STEP_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)))
    assert _small_step_threads("--model", "m") == {"2"}
    assert _small_step_threads("--model", "m", "--workers-per-model", "2") == {None}  # they would contend
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert _small_step_threads("--model", "m") == {None}
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)))
    monkeypatch.setenv("INFERQ_SMALL_STEP_THREADS", "1")
    assert _small_step_threads("--model", "m") == {"1"}  # what the operator set


def test_serve_caps_malloc_arenas_in_its_children_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread's own glibc arena kept freed memory resident in the worker and the api (docs/benchmarks.md)."""
    from ops.cli import build_parser, build_settings
    from ops.launcher import build_children

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    children = build_children(build_settings(build_parser().parse_args(["serve", "--model", "m"])))
    assert {child.name: child.env.get("MALLOC_ARENA_MAX") for child in children} == {
        "worker": "2",
        "agent": "2",
        "api": "2",
    }
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    children = build_children(build_settings(build_parser().parse_args(["serve", "--model", "m"])))
    assert {child.env["MALLOC_ARENA_MAX"] for child in children} == {"8"}
