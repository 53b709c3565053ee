"""A 100,000-line batch end to end (sim worker, api in its own process): progress shows in request_counts while it
runs, a cancel stops it, and every one of the 100k input lines gets exactly one line in the output or error file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import openai
import pytest

from tests.integration.harness import own_sim_stack
from tests.integration.test_batches import read_lines

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
LINES = 100_000
RUN_BEFORE_CANCEL = 1_000


def write_input(path: Path) -> None:
    with path.open("w") as target:
        for i in range(LINES):
            target.write(
                json.dumps(
                    {
                        "custom_id": f"c{i}",
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": {"model": "sim", "prompt": f"w{i % 100} w7", "max_tokens": 2},
                    }
                )
                + "\n"
            )


async def test_a_100k_line_batch_shows_progress_cancels_and_accounts_for_every_line(base_settings, tmp_path) -> None:
    async with own_sim_stack(
        base_settings,
        tmp_path,
        served_model_name="sim",
        sim_tokens_per_s=1000.0,
        max_num_seqs=64,
        batch_max_lines=LINES,
    ) as (settings, worker, api):
        client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        write_input(tmp_path / "input.jsonl")
        with (tmp_path / "input.jsonl").open("rb") as source:
            upload = await client.files.create(file=source, purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
        progress = []
        deadline = time.monotonic() + 600  # a hang guard
        while batch.status not in ("cancelled", "completed", "failed"):
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.5)
            batch = await client.batches.retrieve(batch.id)
            if batch.status == "in_progress":
                progress.append(batch.request_counts.completed)
                if progress[-1] >= RUN_BEFORE_CANCEL and batch.status == "in_progress":
                    await client.batches.cancel(batch.id)
        output = await read_lines(client, batch.output_file_id)
        errors = await read_lines(client, batch.error_file_id)

    assert batch.status == "cancelled"
    assert len(set(progress)) >= 2, progress  # counts moved while it ran
    counts = batch.request_counts
    assert counts.total == LINES and counts.completed + counts.failed == LINES
    assert RUN_BEFORE_CANCEL <= counts.completed < LINES
    assert len(output) == counts.completed and len(errors) == counts.failed
    custom_ids = [line["custom_id"] for line in output + errors]
    assert len(custom_ids) == LINES and set(custom_ids) == {f"c{i}" for i in range(LINES)}
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"]["status_code"] == 200 for line in output)
