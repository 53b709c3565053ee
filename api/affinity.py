"""The edge's half of affinity routing (docs/routing.md): which key a request is routed by, and whether it goes to
the own subject of the worker that key belongs to or to the shared queue. Counted per model for `/metrics`."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import structlog
from nats.js import JetStreamContext
from prometheus_client.core import CounterMetricFamily, Metric

from api.catalog import ModelCatalog
from api.schemas.openai import ChatMessage, GenerationFields
from broker import subjects
from broker.affinity import affine_backlog, prefix_key, rendezvous_pick, salted_key
from contracts import GenerateRequest

log = structlog.get_logger(__name__)

AFFINE = "affine"
# Why a request went to the shared queue instead.
ONE_WORKER = "one_worker"  # nothing to choose between
BUSY = "busy"  # the chosen worker's own subject already holds `max_waiting` requests
UNAVAILABLE = "unavailable"  # the chosen worker has no own consumer (affinity off there) or NATS did not answer


def client_key(cache_key: str | None = None, user: str | None = None) -> str | None:
    """The client's own routing key: its cache key (OpenAI's `prompt_cache_key`), else the id of its end user
    (`user`, OpenAI's `safety_identifier`, Anthropic's `metadata.user_id`); None if it gave neither."""
    if cache_key:
        return "cache_key:" + cache_key
    if user:
        return "user:" + user
    return None


def explicit_key(body: GenerationFields) -> str | None:
    """The routing key a chat or completions body gives: `prompt_cache_key`, else `user`."""
    return client_key(body.prompt_cache_key, body.user)


def conversation_key(messages: Iterable[ChatMessage], explicit: str | None = None) -> str:
    """A conversation's key: the client's (`explicit`), else its opening, the messages up to and including the first
    user message (characters, not tokens: no second template render). Every later turn of the conversation starts
    with the same messages, and two conversations under one shared system prompt still differ by their first
    question, which keying on the first prompt tokens alone would not tell apart. Every surface that renders a
    conversation (chat, Responses, Messages) keys it here, from the chat messages it renders."""
    if explicit is not None:
        return explicit
    opening = []
    for message in messages:
        opening.append([message.role, message.text()])
        if message.role == "user":
            break
    return "chat:" + json.dumps(opening, ensure_ascii=False)


class AffinityRouter:
    """`stale_after_s`: a worker whose registry entry was last renewed longer ago than this is not chosen (it renews
    every registry TTL / 4, so a worker that died stops being chosen well before its entry expires)."""

    def __init__(
        self,
        js: JetStreamContext,
        catalog: ModelCatalog,
        max_waiting: int,
        prefix_tokens: int,
        stale_after_s: float = 5.0,
        clock=time.time,
    ):
        self._js = js
        self._catalog = catalog
        self._max_waiting = max_waiting
        self._prefix_tokens = prefix_tokens
        self._stale_after_s = stale_after_s
        self._clock = clock
        self.counts: Counter[tuple[str, str]] = Counter()  # (model, AFFINE or a fallback reason) → requests

    async def subject_for(self, request: GenerateRequest, owner: str, key: str | None) -> str | None:
        """The own subject of the worker `key` (else the prompt's leading tokens) belongs to among the model's live
        workers, salted with `owner`; None: publish to the shared subject."""
        route, subject = await self._route(request, owner, key)
        self.counts[(request.model, route)] += 1
        return subject

    async def _route(self, request: GenerateRequest, owner: str, key: str | None) -> tuple[str, str | None]:
        try:
            fresh_since = self._clock() - self._stale_after_s
            workers = [
                worker.worker_id
                for worker in await self._catalog.workers()
                if worker.model == request.model and worker.updated_at >= fresh_since
            ]
        except Exception as exc:  # the registry unreadable: the shared queue needs no choice
            log.warning("affinity.registry_failed", error=repr(exc))
            return UNAVAILABLE, None
        if len(workers) < 2:
            return ONE_WORKER, None
        key = key or prefix_key(request.prompt_token_ids[: self._prefix_tokens])
        worker_id = rendezvous_pick(salted_key(owner, key), workers)
        try:
            backlog = await affine_backlog(self._js, request.model, worker_id)
        except Exception as exc:  # NATS failing over: the shared queue is the safe choice
            log.warning("affinity.backlog_failed", worker_id=worker_id, error=repr(exc))
            return UNAVAILABLE, None
        if backlog is None:
            return UNAVAILABLE, None
        if backlog >= self._max_waiting:
            return BUSY, None
        return AFFINE, subjects.affine_subject(request.model, worker_id)

    def collect(self) -> Iterator[Metric]:
        """This edge's routing decisions (prometheus_client collector protocol)."""
        routed = CounterMetricFamily(
            "inferq:affinity_routed", "Requests this edge sent to a worker's own subject.", labels=["model_name"]
        )
        fallback = CounterMetricFamily(
            "inferq:affinity_fallback",
            "Requests this edge sent to the shared queue instead, by reason (one_worker, busy, unavailable).",
            labels=["model_name", "reason"],
        )
        for (model, route), count in sorted(self.counts.items()):
            if route == AFFINE:
                routed.add_metric([model], count)
            else:
                fallback.add_metric([model, route], count)
        yield routed
        yield fallback
