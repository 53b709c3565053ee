"""Batch input lines are judged deterministically (the finalizer re-reads the file and must agree with the run),
and streamed from disk."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.batch.lines import BatchLine, InvalidLine, LineParser, read_lines
from api.schemas.batches import BatchCreateRequest


def line(custom_id: object = "a", url: str = "/v1/chat/completions", **body: object) -> bytes:
    body = body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def verdicts(raw_lines: list[bytes]) -> list[str]:
    parser = LineParser("/v1/chat/completions")
    results = [parser.parse(number, raw) for number, raw in enumerate(raw_lines, start=1)]
    return ["ok" if isinstance(result, BatchLine) else result.error.code for result in results]


def test_each_kind_of_bad_line_gets_its_own_code() -> None:
    assert verdicts(
        [
            line("a"),
            b"{oops",
            b"[1]",
            line(None),
            line("a"),
            line("b", url="/v1/completions"),
            line("c", model="m"),
            line("d", model="m", messages=[{"role": "user", "content": "x"}], stream=True),
            line("e\n"),
        ]
    ) == [
        "ok",
        "invalid_json",
        "invalid_request",
        "missing_custom_id",
        "duplicate_custom_id",
        "invalid_url",
        "invalid_request",
        "invalid_request",
        "invalid_custom_id",
    ]


def test_the_same_file_gets_the_same_verdicts_twice() -> None:
    raw_lines = [line("a"), line("a"), b"nope", line("b")]
    assert verdicts(raw_lines) == verdicts(raw_lines) == ["ok", "duplicate_custom_id", "invalid_json", "ok"]


def test_a_duplicate_keeps_the_first_line_and_names_the_line(tmp_path: Path) -> None:
    parser = LineParser("/v1/chat/completions")
    first, second = parser.parse(1, line("a")), parser.parse(7, line("a"))
    assert isinstance(first, BatchLine) and isinstance(second, InvalidLine)
    assert second.number == 7 and second.custom_id == "a"


def test_blank_lines_are_skipped_and_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a":1}\n\n   \n{"b":2}')
    assert [number for number, _ in read_lines(path)] == [1, 4]


def test_completion_windows_are_durations() -> None:
    assert BatchCreateRequest(input_file_id="f", endpoint="/v1/completions", completion_window="24h").window_s == 86_400
    assert BatchCreateRequest(input_file_id="f", endpoint="e", completion_window="90s").window_s == 90
    assert BatchCreateRequest(input_file_id="f", endpoint="e", completion_window="7d").window_s == 7 * 86_400
    for unbounded in ("8d", "169h", "99999999999d"):
        with pytest.raises(ValidationError, match="at most 7d"):
            BatchCreateRequest(input_file_id="f", endpoint="e", completion_window=unbounded)


def test_judging_a_100k_line_file_holds_one_line_at_a_time(tmp_path) -> None:
    """The runner reads, judges and drops each line: memory grows with the custom_id digests (16 bytes a line),
    not with the file."""
    path = tmp_path / "big.jsonl"
    padding = " ".join(f"word{j}" for j in range(120))
    with path.open("w") as target:
        for i in range(100_000):
            target.write(
                json.dumps(
                    {
                        "custom_id": f"line-{i}",
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"model": "m", "prompt": f"{i} {padding}", "max_tokens": 2},
                    }
                )
                + "\n"
            )
    assert path.stat().st_size > 80_000_000
    parser = LineParser("/v1/completions")
    tracemalloc.start()
    try:
        valid = sum(isinstance(parser.parse(number, raw), BatchLine) for number, raw in read_lines(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert valid == 100_000
    assert peak < 25_000_000, f"peak {peak / 1e6:.1f} MB while judging an {path.stat().st_size / 1e6:.0f} MB file"
