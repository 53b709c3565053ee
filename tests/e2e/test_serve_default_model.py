"""`inferq serve` as a user runs it: embedded NATS + worker + API on the packaged SmolLM2, driven by the openai
SDK, then stopped with SIGTERM leaving no process behind."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.serve import start_serve, wait_healthy
from tests.model_fixtures import seed_model_cache

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
def served(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path
) -> Iterator[tuple[str, subprocess.Popen, set[int]]]:
    data_dir = tmp_path_factory.mktemp("serve-data")
    log_path = data_dir / "serve.log"
    # The session's dequantized copy in the data dir's model cache (Settings.model_cache_dir): the worker finds
    # it where its own first start would have written it, instead of spending ~25 s converting the GGUF again.
    seed_model_cache(data_dir / "models", smollm2_dir)
    proc, base = start_serve({"INFERQ_DATA_DIR": str(data_dir), "INFERQ_LOG_FORMAT": "json"}, log_path)
    wait_healthy(proc, base, log_path, timeout=300)
    children = _descendants(proc.pid)
    yield base, proc, children
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_openai_sdk_chat_and_completions(served) -> None:
    base, _, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list().data] == [MODEL]

    reply = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in reply.choices[0].message.content

    text = (
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        .choices[0]
        .text
    )
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == text and "Paris" in text

    chunks = list(
        client.chat.completions.create(
            model=MODEL, max_tokens=8, temperature=0, stream=True, messages=[{"role": "user", "content": "Say hi"}]
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sigterm_stops_everything(served) -> None:
    _, proc, children = served
    assert children, "serve should have started nats-server, a worker and the api"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(0.5)
    alive = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    assert alive == []
