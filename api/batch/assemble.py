"""A batch's output and error files, built by re-reading the input: every input line yields exactly one line,
in the output file (its stored result succeeded) or in the error file (invalid, failed, or never run before the
batch ended). The files are a pure function of the input and the stored results (read in one pass before the
input is, api/batch/stored.py), so a runner that dies while assembling leaves nothing half-done: the next one
assembles the same files again."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from api.batch.lines import InvalidLine, LineParser, error_line, read_lines, result_line
from api.batch.records import new_object_id
from api.batch.stored import StoredResults
from broker.batch_store import BatchStorage
from contracts import BatchJob, FilePurpose, FileRecord, LineResult
from contracts.batch import LineError, RequestCounts, TokenTotals

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Tally:
    """Counts and token totals as lines are accounted for."""

    counts: RequestCounts = field(default_factory=RequestCounts)
    input_tokens: int = 0
    output_tokens: int = 0

    def failed(self) -> None:
        self.counts = self.counts.model_copy(update={"failed": self.counts.failed + 1})

    def add(self, result: LineResult) -> None:
        if result.succeeded:
            self.counts = self.counts.model_copy(update={"completed": self.counts.completed + 1})
        else:
            self.failed()
        self.input_tokens += result.usage.input_tokens
        self.output_tokens += result.usage.output_tokens

    @property
    def usage(self) -> TokenTotals:
        return TokenTotals(input_tokens=self.input_tokens, output_tokens=self.output_tokens)


@dataclass(frozen=True, slots=True)
class Assembled:
    output_file_id: str | None
    error_file_id: str | None
    counts: RequestCounts
    usage: TokenTotals

    @property
    def file_ids(self) -> list[str]:
        return [file_id for file_id in (self.output_file_id, self.error_file_id) if file_id]


async def assemble(
    job: BatchJob,
    input_path: Path,
    storage: BatchStorage,
    unfinished: LineError,
    on_line: Callable[[], None] = lambda: None,
) -> Assembled:
    """Write and store the files; `unfinished` is the error of a valid line that has no stored result; `on_line`
    is called as each line is written (the run shows it is moving)."""
    parser = LineParser(job.endpoint)
    tally = Tally()
    total = 0
    with tempfile.TemporaryFile() as spill, tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as errors:
        results = await StoredResults.read(storage.results, job.id, spill, on_chunk=on_line)
        for number, raw in read_lines(input_path):
            on_line()
            total += 1
            parsed = parser.parse(number, raw)
            if isinstance(parsed, InvalidLine):
                _write(errors, error_line(job.id, number, parsed.custom_id, parsed.error))
                tally.failed()
                continue
            result = results.get(parsed.custom_id)
            if result is None:
                _write(errors, error_line(job.id, number, parsed.custom_id, unfinished))
                tally.failed()
                continue
            _write(output if result.succeeded else errors, result_line(job.id, number, result))
            tally.add(result)
        output_id = await _store(storage, job, output, "output")
        error_id = await _store(storage, job, errors, "errors")
    counts = tally.counts.model_copy(update={"total": total})
    return Assembled(output_id, error_id, counts, tally.usage)


def _write(target: BinaryIO, line: dict) -> None:
    target.write(json.dumps(line, separators=(",", ":"), allow_nan=False).encode() + b"\n")


async def _store(storage: BatchStorage, job: BatchJob, contents: BinaryIO, kind: str) -> str | None:
    if contents.tell() == 0:
        return None  # OpenAI leaves the id null when there is nothing to report
    contents.seek(0)
    record = FileRecord(
        id=new_object_id("file-"),
        filename=f"{job.id}_{kind}.jsonl",
        purpose=FilePurpose.BATCH_OUTPUT,
        bytes=0,
        created_at=int(time.time()),
        owner=job.owner,
    )
    await storage.files.put(record, contents)
    return record.id


async def discard(storage: BatchStorage, assembled: Assembled) -> None:
    """Files assembled by a runner that then lost the batch: nobody will ever point at them."""
    for file_id in assembled.file_ids:
        try:
            await storage.files.delete(file_id)
        except Exception as exc:  # best effort: an orphan file costs storage, not correctness
            log.warning("batch.discard_failed", file_id=file_id, error=str(exc))
