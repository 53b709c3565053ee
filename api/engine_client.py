"""The edge's view of the engines, as routes and serving code use it: submit a request, get a Generation to
iterate (api/generation.py). The one implementation talks NATS (api/nats_engine_client.py); nothing above this
protocol knows subjects, streams or the journal.

Variants, not flags: a route hands serving code the client that charges its caller (`charging`), the batch runner
one in its own lane (`in_lane`), each batch line one deduplicated under the line's key (`keyed`), a conversation
one routed by its key to the worker that holds its cache (`routed_by`, docs/routing.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from api.auth.metering import Meter
from api.generation import Generation, Timeouts, merge
from broker.work_queue import Lane
from contracts import EmbedRequest, GenerateRequest

__all__ = ["EngineClient", "Generation", "Timeouts", "merge"]


class EngineClient(Protocol):
    timeouts: Timeouts

    def reply_subject(self, request_id: str) -> str:
        """Where the request's events are to be sent (a request names it; the engine answers there)."""

    async def submit(self, request: GenerateRequest | EmbedRequest, *, attach_duplicate: bool = False) -> Generation:
        """Queue the request; ApiError at once if it cannot be (full, over the caller's budget, unavailable)."""

    async def submit_all(self, requests: Sequence[GenerateRequest], *, attach: bool = False) -> list[Generation]:
        """Several requests, all or none; `attach`: their ids are the client's, follow any already submitted."""

    async def resume(self, request: GenerateRequest) -> Generation:
        """Follow a request submitted earlier (by any edge) from its start; 404 if it is no longer known."""

    def charging(self, meter: Meter | None) -> EngineClient:
        """This client, reserving each submission's tokens from `meter` (the caller's budget)."""

    def keyed(self, idempotency_key: str) -> EngineClient:
        """This client, deduplicating its submissions under `idempotency_key`."""

    def routed_by(self, key: str | None) -> EngineClient:
        """This client, routing its submissions by `key` (a conversation's; None: the prompt's leading tokens)."""

    def in_lane(self, lane: Lane, timeouts: Timeouts) -> EngineClient:
        """This client, submitting to another lane with other timeouts."""
