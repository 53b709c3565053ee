"""A batch line whose workers keep dying under it (a "poison" input: one that makes the engine process segfault
or run out of memory) fails after a budget of runs instead of running again for ever.

One run of a line (`run_line`) already survives workers going silent under it: the edge resumes it on up to
`Timeouts.max_attempts` workers and only then answers `worker_lost`, which the runner treats as passing (the
worker acks a request when it admits it, so JetStream's max_deliver never comes into it). Every such lost run is
counted in the batch's result store, beside the line's result (broker/batch_store.py), so the count outlives the
runner: an api restarted, or another replica that takes the batch over, goes on from it. Once the count reaches
the budget, the line's result is a `worker_crashed` error (the code a direct publish whose workers died
`max_deliver` times gets, broker/max_deliveries.py), stored once like any result, and the batch goes on with the
rest.

Runs are counted, not workers: a line whose worker was killed by chance (chaos runs SIGKILL workers) or that only
shared a worker with a poison line resumes from its tokens on the next worker and is never charged; a line is
charged only when all the workers of one run were lost, and fails only after that happened `budget` times."""

from __future__ import annotations

import structlog

from api.batch.lines import failed_result
from api.errors import ApiError
from broker.batch_store import ResultStore
from broker.errors import BrokerError
from contracts import ErrorCode, LineResult

log = structlog.get_logger(__name__)


class LossBudget:
    """The lost runs one batch's lines may have: `max_runs` each."""

    def __init__(self, results: ResultStore, batch_id: str, max_runs: int):
        self._results = results
        self._batch_id = batch_id
        self._max_runs = max_runs

    async def lost(self, custom_id: str) -> LineResult | None:
        """Count a run of the line that lost its workers: None while the line may run again, its `worker_crashed`
        result once the budget is spent."""
        try:
            runs = await self._results.count_loss(self._batch_id, custom_id)
        except BrokerError as exc:  # NATS reconnecting: this run goes uncounted, the line simply runs again
            log.warning("batch.line_loss_uncounted", batch_id=self._batch_id, custom_id=custom_id, error=str(exc))
            return None
        if runs < self._max_runs:
            log.warning(
                "batch.line_lost", batch_id=self._batch_id, custom_id=custom_id, runs=runs, budget=self._max_runs
            )
            return None
        log.error("batch.line_workers_died", batch_id=self._batch_id, custom_id=custom_id, runs=runs)
        message = f"this line's workers died under it in {runs} runs (each resumed on other workers); it is not retried"
        return failed_result(custom_id, ApiError(ErrorCode.WORKER_CRASHED, message))
