"""A batch line whose input kills every worker that runs it (a sim worker SIGKILLs itself mid-generation on a
poison token, tests/integration/poison_sim.py; a supervisor starts a new worker each time, as `inferq serve`
does) ends as one `worker_crashed` line in the error file after INFERQ_BATCH_LINE_MAX_ATTEMPTS runs, and the batch
completes with the rest; a line that killed one whole run's workers and then runs succeeds. Before: the poison
line ran again for ever and the batch never left `in_progress`."""

from __future__ import annotations

import asyncio
import contextlib

import openai
import pytest

from broker.embedded import EmbeddedNatsServer
from tests.integration.harness import ApiServer, WorkerProcess, own_sim_settings, wait_healthy
from tests.integration.test_batches import read_lines, start_batch, wait_final

pytestmark = pytest.mark.asyncio
MODEL = "sim-poison"


class Respawning:
    """The worker, started again whenever it died."""

    def __init__(self, settings, tmp_path, preamble: str):
        self._settings = settings
        self._tmp_path = tmp_path
        self._preamble = preamble
        self.starts = 0
        self.worker = self._start()

    def _start(self) -> WorkerProcess:
        self.starts += 1
        log = self._tmp_path / f"worker-{self.starts}.log"
        return WorkerProcess(self._settings, log, preamble=self._preamble).start()

    async def supervise(self) -> None:
        while True:
            if self.worker.proc.poll() is not None:
                self.worker.stop()
                self.worker = self._start()
            await asyncio.sleep(0.1)


def line(custom_id: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


@pytest.mark.slow
async def test_a_line_that_kills_every_worker_fails_once_and_the_batch_completes(base_settings, tmp_path) -> None:
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    with EmbeddedNatsServer(tmp_path / "nats", port=-1) as nats:
        settings = own_sim_settings(
            base_settings,
            nats.url,
            tmp_path,
            served_model_name=MODEL,
            sim_tokens_per_s=50.0,
            worker_silence_timeout_s=2.0,
            batch_line_max_attempts=2,
            batch_line_concurrency=1,  # one line at a time: each death is the line's own
        )
        workers = Respawning(
            settings, tmp_path, f"import tests.integration.poison_sim as p; p.install({str(deaths)!r})"
        )
        api = ApiServer(settings).start()
        supervisor = asyncio.create_task(workers.supervise())
        try:
            await wait_healthy(api.base_url, workers.worker)
            client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)
            batch = await start_batch(
                client,
                [
                    line("ok-1", "w5 w6", 4),
                    line("flaky", "w5 w14", 10),  # kills the 3 workers of its first run, then runs
                    line("poison", "w5 w13", 10),  # kills every worker: 2 runs of 3
                    line("ok-2", "w6 w7", 4),
                ],
            )
            done = await wait_final(client, batch.id, timeout=300)
            output = {entry["custom_id"]: entry for entry in await read_lines(client, done.output_file_id)}
            errors = await read_lines(client, done.error_file_id)
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            api.stop()
            workers.worker.stop()

    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    assert set(output) == {"ok-1", "flaky", "ok-2"}
    assert output["flaky"]["response"]["body"]["usage"]["completion_tokens"] == 10
    [poison] = errors
    assert poison["custom_id"] == "poison" and poison["error"]["code"] == "worker_crashed"
    assert "died under it in 2 runs" in poison["error"]["message"]
    assert poison["response"]["status_code"] == 500
    assert len(list(deaths.glob("flaky-*"))) == 3
    assert workers.starts == 1 + 3 + 6  # the flaky line's first run, and both runs of the poison line
