"""`inferq serve`: the whole service on one machine from one command.

Supervises an embedded nats-server (unless `nats_url` points at one), the workers, the agent and the api, each
a child in its own process group that dies with us, each restarted with backoff if it crashes. Ready = the
api's `/health` is 200, i.e. a worker is live. Stops in reverse: api (no new requests), worker, NATS last (both
others need it to drain)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import structlog
from pydantic_settings import NoDecode

from common.models import PACKAGED_MODELS, ModelNotFound, packaged_model
from common.process import spawn, stop_on_signals, terminate
from common.settings import Settings
from contracts.supervision import ProcessState, SupervisedProcess, SupervisorStatus
from ops.layout import choose_layout, estimate_worker_bytes, has_gpu, threads_per_worker, usable_cores, weight_files
from ops.restart_policy import CrashHistory, GiveUp, RestartPolicy

if TYPE_CHECKING:
    from broker.embedded import EmbeddedNatsServer

log = structlog.get_logger(__name__)

ENV_PREFIX = "INFERQ_"
NATS_NAME = "nats-server"
_MIN_STOP_S = 0.5  # even past the stop deadline, each child gets a moment to exit on SIGTERM
STATUS_FILE_NAME = "supervisor.json"  # in the data dir; rewritten at every start, so a stale one does no harm
# glibc gives each thread that allocates an arena of its own (up to 8 per core), and freed memory stays in the
# arena that held it: the worker (loader, engine, mask and event-loop threads) held ~57 MiB more after traffic with
# them than with two in consecutive runs (docs/benchmarks.md, "Memory of the default start"); the api and agent
# did not change measurably. Two arenas suffice where one or two threads allocate at once. Our own value wins.
MALLOC_ARENAS = {"MALLOC_ARENA_MAX": "2"}


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process. `ready_check` is polled until it is True; None means ready once started.
    `essential`: the service cannot go on without it, so giving up on it stops everything."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    ready_check: Callable[[], bool] | None = None
    essential: bool = False


BuildChildren = Callable[[Settings], list[ChildSpec]]


# --- what runs ----------------------------------------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """Every field as the `INFERQ_*` variable that reproduces it, so a child's `Settings()` equals ours.
    Unset (None) fields are left out; the caller also removes inherited ones (see `child_env`)."""
    env: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, list | tuple | set | dict):
            # NoDecode fields take comma-separated text (api_keys); other complex fields are JSON-decoded.
            comma = any(isinstance(meta, NoDecode) or meta is NoDecode for meta in field.metadata)
            text = ",".join(map(str, value)) if comma else json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"{ENV_PREFIX}{name.upper()}"] = text
    return env


def child_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a child gets: ours without any `INFERQ_*`, plus the resolved settings."""
    inherited = os.environ if base is None else base
    env = {key: value for key, value in inherited.items() if not key.startswith(ENV_PREFIX)}
    env.update(settings_env(settings))
    return env


def build_children(settings: Settings) -> list[ChildSpec]:
    """The real service: `workers_per_model` workers per model, the deployment agent, then the api, each
    `python -m ops.cli <command>`."""
    env = {**MALLOC_ARENAS, **child_env(settings)}
    cli = [sys.executable, "-m", "ops.cli"]
    api_health = partial(http_ok, f"{api_base_url(settings)}/health")
    models = settings.models
    if len(models) > 1:
        env.pop(f"{ENV_PREFIX}SERVED_MODEL_NAME", None)  # one name cannot serve several models
    per_model = auto_workers_per_model(settings) if settings.workers_per_model == "auto" else settings.workers_per_model
    worker_models = [model for model in models for _ in range(per_model)]
    if settings.torch_threads is None:
        env[f"{ENV_PREFIX}TORCH_THREADS"] = str(colocated_torch_threads(len(worker_models)))
    if settings.small_step_threads is None and len(worker_models) == 1 and usable_cores() > 1:
        # One or two sequences decoding leave the api and NATS nearly idle, so such a step may use every core:
        # 1.19x at concurrency 1 on 2 quiet cores (docs/benchmarks.md, "Threads by load"). Bigger steps keep a
        # core free for them. Several workers would contend for the cores, so they keep torch_threads.
        env[f"{ENV_PREFIX}SMALL_STEP_THREADS"] = str(usable_cores())
    workers = [
        ChildSpec(
            "worker" if len(worker_models) == 1 else f"worker-{index}",
            [*cli, "worker"],
            {**env, f"{ENV_PREFIX}MODEL": model},
        )
        for index, model in enumerate(worker_models)
    ]
    # The node agent starts deployments' workers (POST /api/v1/deploy) on this machine or over SSH.
    agent = [ChildSpec("agent", [*cli, "agent"], env)] if settings.deploy_agent else []
    return [*workers, *agent, ChildSpec("api", [*cli, "api"], env, ready_check=api_health, essential=True)]


def colocated_torch_threads(num_workers: int) -> int:
    """torch threads per worker on the cores this process may use (ops/layout.py `threads_per_worker`).
    `INFERQ_TORCH_THREADS` overrides this."""
    return threads_per_worker(usable_cores(), num_workers)


def auto_workers_per_model(settings: Settings) -> int:
    """Workers per model for INFERQ_WORKERS_PER_MODEL=auto: the measured CPU layout (ops/layout.py) for
    one torch model, within a memory bound; 1 for several models, the sim engine, or a GPU."""
    if settings.engine != "torch" or len(settings.models) != 1:
        return 1
    files = model_weight_files(settings.models[0])
    layout = choose_layout(
        usable_cores(),
        psutil.virtual_memory().available,
        estimate_worker_bytes(
            files, settings.kv_cache_gib, settings.prefix_cache_max_mib if settings.prefix_caching else 0.0
        ),
        gpu=has_gpu(settings.device),
    )
    log.info("serve.layout", workers=layout.workers, torch_threads=layout.threads, reason=layout.reason)
    return layout.workers


def model_weight_files(spec: str) -> list[Path]:
    """The weight files of a packaged model or a local path (not a hub id: nothing is downloaded to size it)."""
    if spec in PACKAGED_MODELS:
        try:
            return weight_files(packaged_model(PACKAGED_MODELS[spec]))
        except ModelNotFound:
            return []
    return weight_files(Path(spec).expanduser())


def api_base_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard bind is reached through loopback from here
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def http_ok(url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 1.0) -> bool:
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def curl_example(base_url: str, model: str, *, auth: bool) -> str:
    message = {"role": "user", "content": "Say hello."}
    body = json.dumps({"model": model, "messages": [message], "max_tokens": 32})
    auth_header = ' -H "Authorization: Bearer $INFERQ_API_KEY"' if auth else ""
    return f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json'{auth_header} -d '{body}'"


# --- supervision --------------------------------------------------------------------------------------------


@dataclass
class _Supervised:
    """One process we watch and restart: a child, or the embedded nats-server."""

    name: str
    history: CrashHistory
    essential: bool  # giving up on it ends the service (the api, NATS): nothing could be served without it
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None  # crashed, to be started again at this time.monotonic()
    gave_up: str | None = None

    @property
    def state(self) -> ProcessState:
        if self.gave_up is not None:
            return ProcessState.GAVE_UP
        return ProcessState.RUNNING if self.restart_at is None else ProcessState.RESTARTING


@dataclass
class _Child(_Supervised):
    spec: ChildSpec = dataclasses.field(kw_only=True)
    proc: subprocess.Popen[bytes] = dataclasses.field(kw_only=True)


def restart_policy(settings: Settings) -> RestartPolicy:
    return RestartPolicy(
        settings.restart_backoff_initial_s,
        settings.restart_backoff_max_s,
        settings.crash_loop_crashes,
        settings.crash_loop_window_s,
    )


class Launcher:
    """Start NATS (maybe), then the children in order; wait until all are ready; then watch them.

    A child or the embedded nats-server that dies is started again after a backoff (`ops.restart_policy`); one
    that crash-loops is given up, loudly, while the rest keeps serving, unless it is the api or NATS, without
    which nothing can be served (then the service stops with exit code 1). Restarts and give-ups are logged and
    written to the status file the api reports on `/metrics`. Exit code 0 after SIGINT/SIGTERM (or
    `request_stop()`), 1 if an essential process was given up, something could not be started, or the children
    were not ready within `ready_timeout_s`."""

    def __init__(
        self,
        settings: Settings,
        build: BuildChildren = build_children,
        *,
        ready_timeout_s: float = 600.0,
        stop_timeout_s: float = 10.0,
        poll_interval_s: float = 0.1,
    ) -> None:
        self.settings = settings
        self._build = build
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.policy = restart_policy(settings)
        self.status_file = settings.data_dir / STATUS_FILE_NAME
        self._stop = threading.Event()
        self._nats: EmbeddedNatsServer | None = None
        self._nats_watch: _Supervised | None = None
        self._children: list[_Child] = []

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        with stop_on_signals(self._stop):
            try:
                return self._run()
            except (RuntimeError, OSError) as exc:  # NATS did not start, a child could not be spawned
                log.error("serve.failed", error=str(exc), error_type=type(exc).__name__)
                return 1
            finally:
                self._shutdown()

    def _run(self) -> int:
        settings = self._resolve(self.settings)
        specs = self._build(settings)
        for spec in specs:
            proc = spawn(spec.argv, env=spec.env)
            self._children.append(_Child(spec.name, CrashHistory(self.policy), spec.essential, spec=spec, proc=proc))
            log.info("child.started", child=spec.name, pid=proc.pid)
        self._write_status()
        if (code := self._await_ready()) is not None:
            return code
        self._announce(settings)
        while (code := self._supervise()) is None:
            self._stop.wait(self.poll_interval_s)
        return code

    def _resolve(self, settings: Settings) -> Settings:
        """Fill in what children must agree on: the NATS URL (start one if none given), a concrete port, and
        where the supervisor's status record is."""
        updates: dict[str, Any] = {"supervisor_status_file": self.status_file}
        if settings.port == 0:
            updates["port"] = _free_port(settings.host)
        if settings.nats_url is None:
            from broker.embedded import EmbeddedNatsServer  # ops imports broker only to launch it

            # die_with_parent: run() is on the main thread for `inferq serve`, which lives as long as we do.
            self._nats = EmbeddedNatsServer(settings.nats_store_dir, die_with_parent=True).start()
            self._nats_watch = _Supervised(NATS_NAME, CrashHistory(self.policy), essential=True)
            updates["nats_url"] = self._nats.url
            log.info("nats.started", url=self._nats.url, store_dir=str(settings.nats_store_dir))
        return settings.model_copy(update=updates)

    def _await_ready(self) -> int | None:
        """None once every child is ready; otherwise the exit code to stop with. Children that die meanwhile
        are restarted like later."""
        deadline = time.monotonic() + self.ready_timeout_s
        pending = [child for child in self._children if child.spec.ready_check is not None]
        while pending:
            if (code := self._supervise()) is not None:
                return code
            if given_up := [child.name for child in self._children if child.gave_up is not None]:
                # Before ready, a crash loop is a start that failed (a bad model path, a taken port): say so.
                log.error("serve.not_ready", given_up=given_up)
                return 1
            pending = [
                child for child in pending if not (child.state is ProcessState.RUNNING and _is_ready(child.spec))
            ]
            if not pending:
                break
            if time.monotonic() > deadline:
                waiting = [child.spec.name for child in pending]
                log.error("serve.not_ready", waiting_for=waiting, timeout_s=self.ready_timeout_s)
                return 1
            self._stop.wait(self.poll_interval_s)
        return None

    def _supervise(self) -> int | None:
        """One look at everything: restart what is due, handle what died. 0 if a stop was requested, 1 if an
        essential process was given up, None while the service goes on."""
        if self._stop.is_set():
            return 0
        changed = False
        if self._nats_watch is not None and self._nats is not None:
            changed |= self._check(self._nats_watch, self._nats.poll, self._restart_nats)
        for child in self._children:
            changed |= self._check(child, child.proc.poll, partial(self._restart_child, child))
        if changed:
            self._write_status()
        watched = [*([self._nats_watch] if self._nats_watch else []), *self._children]
        return 1 if any(item.essential and item.gave_up for item in watched) else None

    def _check(self, item: _Supervised, poll: Callable[[], int | None], restart: Callable[[], None]) -> bool:
        """Restart `item` if its backoff is over, or decide about it if it died. True if its state changed."""
        if item.gave_up is not None:
            return False
        now = time.monotonic()
        if item.restart_at is not None:
            if now < item.restart_at:
                return False
            item.restart_at = None
            item.restarts += 1
            item.started_at = now
            try:
                restart()
            except (RuntimeError, OSError) as exc:  # it could not even start: a crash like any other
                log.error("child.restart_failed", child=item.name, error=str(exc))
                self._decide(item, now, returncode=1)
            return True
        if (returncode := poll()) is None:
            return False
        self._decide(item, now, returncode)
        return True

    def _decide(self, item: _Supervised, now: float, returncode: int) -> None:
        extra = {"log_tail": self._nats.log_tail()} if item is self._nats_watch and self._nats else {}
        log.error("child.died", child=item.name, returncode=returncode, restarts=item.restarts, **extra)
        decision = item.history.crashed(now, item.started_at, returncode)
        if isinstance(decision, GiveUp):
            item.gave_up = decision.reason
            consequence = (
                "stopping the service: nothing can be served without it"
                if item.essential
                else "not restarting it; everything else keeps serving"
            )
            log.critical(
                "child.gave_up",
                child=item.name,
                reason=decision.reason,
                consequence=consequence,
                restarts=item.restarts,
            )
        else:
            item.restart_at = now + decision.delay_s
            log.warning("child.restart_scheduled", child=item.name, delay_s=decision.delay_s, restarts=item.restarts)

    def _restart_child(self, child: _Child) -> None:
        terminate(child.proc, timeout_s=0)  # it is dead; this sweeps what it left in its process group
        child.proc = spawn(child.spec.argv, env=child.spec.env)
        log.warning("child.restarted", child=child.name, pid=child.proc.pid, restarts=child.restarts)

    def _restart_nats(self) -> None:
        assert self._nats is not None
        self._nats.restart()  # same port and store: clients reconnect, JetStream recovers its store
        log.warning(
            "child.restarted",
            child=NATS_NAME,
            pid=self._nats.pid,
            url=self._nats.url,
            restarts=self._nats_watch.restarts if self._nats_watch else 0,
        )

    def _write_status(self) -> None:
        watched = [*([self._nats_watch] if self._nats_watch else []), *self._children]
        status = SupervisorStatus(
            updated_at=time.time(),
            processes=[
                SupervisedProcess(name=item.name, state=item.state, restarts=item.restarts, reason=item.gave_up)
                for item in watched
            ],
        )
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            partial_file = self.status_file.with_suffix(".tmp")
            partial_file.write_bytes(status.to_bytes())
            partial_file.replace(self.status_file)  # atomic: a reader never sees half a record
        except OSError as exc:  # only /metrics loses detail; supervision goes on
            log.warning("serve.status_unwritable", path=str(self.status_file), error=str(exc))

    def _announce(self, settings: Settings) -> None:
        base_url = api_base_url(settings)
        model = _served_model_id(base_url, settings)
        log.info("serve.ready", url=base_url, model=model, nats=settings.nats_url)
        log.info(curl_example(base_url, model, auth=bool(settings.api_keys)))

    def _shutdown(self) -> None:
        # One deadline for all children, not one each: the api waits for open streams and a worker drains its
        # requests, so with a stream in flight each would use its whole timeout, and a stop took 20 s or more.
        deadline = time.monotonic() + self.stop_timeout_s
        for child in reversed(self._children):
            returncode = terminate(child.proc, timeout_s=max(_MIN_STOP_S, deadline - time.monotonic()))
            log.info("child.stopped", child=child.spec.name, returncode=returncode)
        self._children.clear()
        if self._nats is not None:
            returncode = self._nats.stop()
            log.info("nats.stopped", returncode=returncode)
            self._nats = None


def _is_ready(spec: ChildSpec) -> bool:
    return spec.ready_check is None or spec.ready_check()


def _served_model_id(base_url: str, settings: Settings) -> str:
    """The id clients should send: asked from the api (the worker derives it), else our best guess."""
    headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}
    try:
        request = urllib.request.Request(f"{base_url}/v1/models", headers=headers)
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return str(json.load(response)["data"][0]["id"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
        return settings.served_model_name or settings.model


def _free_port(host: str) -> int:
    """For `--port 0`: the api's port must be known before it starts, so children and the curl line agree."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_serve(settings: Settings) -> int:
    return Launcher(settings).run()
