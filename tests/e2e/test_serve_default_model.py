"""`inferq serve` as a user runs it: embedded NATS + worker + API on the packaged SmolLM2, driven by the openai
SDK, then stopped with SIGTERM leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.harness import free_port

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


def _descendants(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                children.add(int(entry.name))
    for child in list(children):
        children |= _descendants(child)
    return children


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen, set[int]]]:
    port = free_port()
    data_dir = tmp_path_factory.mktemp("serve-data")
    log = open(data_dir / "serve.log", "wb")
    env = {**os.environ, "INFERQ_PORT": str(port), "INFERQ_DATA_DIR": str(data_dir), "INFERQ_LOG_FORMAT": "json"}
    env.pop("INFERQ_NATS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # first start dequantizes the GGUF
    while True:
        assert proc.poll() is None, (data_dir / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "inferq serve did not become healthy"
        time.sleep(0.5)
    children = _descendants(proc.pid)
    yield base, proc, children
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    log.close()


def test_openai_sdk_chat_and_completions(served) -> None:
    base, _, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list().data] == [MODEL]

    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content

    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                     temperature=0).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == text and "Paris" in text

    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Say hi"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sigterm_stops_everything(served) -> None:
    _, proc, children = served
    assert children, "serve should have started nats-server, a worker and the api"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == []
