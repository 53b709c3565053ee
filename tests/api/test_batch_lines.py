"""Batch input lines are judged deterministically (the finalizer re-reads the file and must agree with the run),
and streamed from disk."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert verdicts([
        line("a"), b"{oops", b"[1]", line(None), line("a"), line("b", url="/v1/completions"),
        line("c", model="m"), line("d", model="m", messages=[{"role": "user", "content": "x"}], stream=True),
        line("e\n"),
    ]) == ["ok", "invalid_json", "invalid_request", "missing_custom_id", "duplicate_custom_id", "invalid_url",
           "invalid_request", "invalid_request", "invalid_custom_id"]


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
