"""A batch line whose workers die under every run of it (a poison input) fails with `worker_crashed` after
`line_max_attempts` runs, once, and the batch completes with the rest; a line lost fewer times still succeeds; the
count of lost runs is stored with the batch, so a runner that resumes the batch goes on from it. Real server for
the storage; `run_line` is scripted (no worker needed)."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from dataclasses import replace

import pytest

import api.batch.job as job_module
from api.batch.job import JobRun
from api.batch.lines import BatchLine, RetryLater
from api.errors import ApiError
from api.services import Services
from broker.batch_store import BatchStorage
from common.settings import Settings
from contracts import BatchStatus, ErrorCode, LineResult
from tests.api.batch.test_batch_job import context, seed_batch

pytestmark = pytest.mark.asyncio
LOST = "lost"


class KeyedEngine:
    """The engine client as a line's run asks for it; the scripted run_line never uses it."""

    def keyed(self, key: str) -> KeyedEngine:
        return self

    def charging(self, meter: object) -> KeyedEngine:
        return self


class ScriptedLines:
    """`run_line` stand-in: each custom_id's outcomes in order ("lost": its workers died under the whole run, which
    the edge answers `worker_lost`); once a script runs out, the line succeeds. A script of None: always lost."""

    def __init__(self, scripts: dict[str, list[str] | None]):
        self._scripts = scripts
        self.runs: Counter[str] = Counter()

    async def __call__(self, line: BatchLine, endpoint: str, services: Services) -> LineResult:
        self.runs[line.custom_id] += 1
        script = self._scripts.get(line.custom_id, [])
        if script is None or (script and script.pop(0) == LOST):
            raise RetryLater(ApiError(ErrorCode.WORKER_LOST, "the worker stopped responding", retry_after=0.01))
        return LineResult(custom_id=line.custom_id, status_code=200, body={"id": f"cmpl-{line.custom_id}"})


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    def install(scripts: dict[str, list[str] | None]) -> ScriptedLines:
        lines = ScriptedLines(scripts)
        monkeypatch.setattr(job_module, "run_line", lines)
        return lines

    return install


def runner(storage: BatchStorage, max_attempts: int = 3):
    services = Services(settings=Settings(), catalog=None, engine=KeyedEngine())  # type: ignore[arg-type]
    return replace(context(storage, "r"), services=services, line_max_attempts=max_attempts)


async def error_lines(storage: BatchStorage, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    contents = io.BytesIO()
    await storage.files.read_into(file_id, contents)
    return [json.loads(raw) for raw in contents.getvalue().splitlines()]


async def test_a_line_whose_workers_die_every_run_fails_once_and_the_batch_completes(
    batch_storage: BatchStorage, scripted
) -> None:
    lines = scripted({"poison": None, "flaky": [LOST, LOST]})
    await seed_batch(batch_storage, "batch_poison", ["ok", "poison", "flaky"], done=[], status=BatchStatus.IN_PROGRESS)

    # Before: never returned (the poison line ran again for ever).
    await asyncio.wait_for(JobRun(runner(batch_storage), "batch_poison").run(), 30)

    done = (await batch_storage.jobs.get("batch_poison")).record
    assert done.status is BatchStatus.COMPLETED
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert lines.runs == {"ok": 1, "poison": 3, "flaky": 3}  # flaky: lost twice, then it ran to its end
    [line] = await error_lines(batch_storage, done.error_file_id)
    assert line["custom_id"] == "poison" and line["error"]["code"] == "worker_crashed"
    assert "died under it in 3 runs" in line["error"]["message"]
    assert line["response"]["status_code"] == 500
    assert line["response"]["body"]["error"]["code"] == "worker_crashed"
    outputs = await error_lines(batch_storage, done.output_file_id)
    assert sorted(output["custom_id"] for output in outputs) == ["flaky", "ok"]


async def test_a_resumed_batch_goes_on_from_the_stored_count_of_lost_runs(
    batch_storage: BatchStorage, scripted
) -> None:
    """A runner counted two lost runs of the line and died; the runner that resumes the batch runs it once more."""
    lines = scripted({"poison": None})
    await seed_batch(batch_storage, "batch_resumed", ["ok", "poison"], done=["ok"], status=BatchStatus.IN_PROGRESS)
    for _ in range(2):
        await batch_storage.results.count_loss("batch_resumed", "poison")

    await asyncio.wait_for(JobRun(runner(batch_storage), "batch_resumed").run(), 30)

    done = (await batch_storage.jobs.get("batch_resumed")).record
    assert done.status is BatchStatus.COMPLETED and done.request_counts.failed == 1
    assert lines.runs == {"poison": 1}
    [line] = await error_lines(batch_storage, done.error_file_id)
    assert line["error"]["code"] == "worker_crashed" and "in 3 runs" in line["error"]["message"]


async def test_other_passing_failures_are_not_charged(batch_storage: BatchStorage, monkeypatch) -> None:
    """No worker, a full queue: nothing died; the line waits them out however often they happen."""
    refusals = iter([ErrorCode.NO_WORKER, ErrorCode.QUEUE_FULL] * 3)

    async def refused_then_run(line: BatchLine, endpoint: str, services: Services) -> LineResult:
        code = next(refusals, None)
        if code is not None:
            raise RetryLater(ApiError(code, "not now", retry_after=0.01))
        return LineResult(custom_id=line.custom_id, status_code=200, body={})

    monkeypatch.setattr(job_module, "run_line", refused_then_run)
    await seed_batch(batch_storage, "batch_busy", ["busy"], done=[], status=BatchStatus.IN_PROGRESS)
    await asyncio.wait_for(JobRun(runner(batch_storage, max_attempts=1), "batch_busy").run(), 30)
    done = (await batch_storage.jobs.get("batch_busy")).record
    assert done.status is BatchStatus.COMPLETED and done.request_counts.completed == 1
