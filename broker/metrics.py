"""Fleet metrics over NATS. A scrape is a scatter-gather: the edge publishes one empty request on
`inf.metrics.scrape` with a reply inbox, every live worker answers with its `WorkerMetrics`, and the edge takes
the answers that arrive within a short window (or until every registered worker has answered). So one scrape of
any API replica sees every worker, with nothing published while nobody scrapes. The queues' backlog comes from
JetStream consumer info, so it is counted even for a model no worker serves right now."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import errors as jse
from pydantic import ValidationError

from broker import subjects
from broker.work_queue import Lane
from contracts.metrics import WorkerMetrics

log = structlog.get_logger(__name__)

# Not in broker/subjects.py only because this module is the one place that uses it.
METRICS_SCRAPE_SUBJECT = "inf.metrics.scrape"
_MODEL_METADATA = "inferq_model"  # set on every work-queue stream by broker.topology
_STREAM_PAGE = 256  # the server's page size for $JS.API.STREAM.LIST
_MAX_STREAM_PAGES = 64


async def serve_metrics(nc: NatsClient, snapshot: Callable[[], WorkerMetrics]) -> Subscription:
    """Worker side: answer every scrape with `snapshot()`. Unsubscribe the returned subscription to stop."""

    async def answer(msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            await msg.respond(snapshot().to_bytes())
        except Exception as exc:  # one failed answer only leaves this worker out of one scrape
            log.warning("metrics.answer_failed", error=str(exc))

    return await nc.subscribe(METRICS_SCRAPE_SUBJECT, cb=answer)


async def scrape_workers(nc: NatsClient, expected: int, timeout: float) -> list[WorkerMetrics]:
    """Edge side: the snapshots of every worker that answers within `timeout`; returns early once `expected`
    distinct workers have answered (the registry's count of live workers)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    answers: dict[str, WorkerMetrics] = {}
    try:
        await nc.publish(METRICS_SCRAPE_SUBJECT, b"", reply=inbox)
        deadline = time.monotonic() + timeout
        while len(answers) < expected or expected <= 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=remaining)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            try:
                metrics = WorkerMetrics.from_bytes(msg.data)
            except ValidationError:
                log.warning("metrics.invalid_snapshot")
                continue
            answers[metrics.worker_id] = metrics
    finally:
        await sub.unsubscribe()
    return sorted(answers.values(), key=lambda m: (m.model, m.worker_id))


@dataclass(frozen=True, slots=True)
class QueueBacklog:
    model: str
    lane: Lane
    waiting: int  # in the stream, not yet delivered, plus delivered but not yet acked (fetched, not admitted),
    # on the shared subject or (interactive lane) on the workers' own subjects


async def queue_backlogs(js: JetStreamContext) -> list[QueueBacklog]:
    """Every model's queues (interactive and batch lane) with what waits in them."""
    backlogs = []
    for stream in await _all_streams(js):
        model = (stream.config.metadata or {}).get(_MODEL_METADATA)
        if model is None:
            continue
        lane = Lane.BATCH if stream.config.name == subjects.batch_stream(model) else Lane.INTERACTIVE
        try:
            info = await js.consumer_info(stream.config.name, subjects.REQUEST_CONSUMER)
        except jse.NotFoundError:
            continue  # the stream is being set up; its consumer comes next
        waiting = info.num_pending + info.num_ack_pending
        if lane is Lane.INTERACTIVE:  # and what waits on the workers' own subjects (affinity, docs/routing.md)
            held = await js.stream_info(stream.config.name, subjects_filter=subjects.affine_wildcard(model))
            waiting += sum((held.state.subjects or {}).values())
        backlogs.append(QueueBacklog(model, lane, waiting))
    return sorted(backlogs, key=lambda b: (b.model, b.lane.value))


async def _all_streams(js: JetStreamContext):
    streams = []
    for _ in range(_MAX_STREAM_PAGES):
        page = await js.streams_info(offset=len(streams))
        streams.extend(page)
        if len(page) < _STREAM_PAGE:  # a short page is the last (asking past the end may answer `null`)
            break
    return streams
