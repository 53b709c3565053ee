"""What the edge adds per token (`--observe-nats`): a passive core-NATS subscriber on the token subjects notes
when each token event leaves NATS; the benchmark client notes when the SSE chunk it became arrives. Both clocks
are this process's `perf_counter`, so there is no clock skew; the subscriber runs on a thread and event loop of
its own, so the client's busy loop does not delay its notes. The difference is the edge's work (decode, frame,
write) plus the HTTP hop. A stream's k-th chunk with text pairs with the k-th token event with text of the
request the chunk's `id` names (one prompt and n=1, as `inferq bench` sends).

Resolution: the subscriber notes an event after its own NATS callback hop, up to about a millisecond late
(measured against a tiny model on this repo's CI machine), so an edge adding less than that reads as ~0 and
single tokens may even read slightly negative; the figures that matter under load are several milliseconds."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nats.aio.msg import Msg

from broker.connection import connect
from ops.bench.metrics import RequestResult

TOKEN_EVENTS = "inf.tok.>"
_START_TIMEOUT_S = 10.0


class TokenObserver:
    def __init__(self) -> None:
        self._left_nats: dict[str, list[float]] = defaultdict(list)  # request id -> each text event's arrival

    @classmethod
    @asynccontextmanager
    async def watching(cls, nats_url: str) -> AsyncIterator[TokenObserver]:
        observer = cls()
        ready, stop = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=asyncio.run, args=(observer._listen(nats_url, ready, stop),), name="nats-observer", daemon=True
        )
        thread.start()
        if not await asyncio.to_thread(ready.wait, _START_TIMEOUT_S):
            raise RuntimeError(f"could not subscribe to {TOKEN_EVENTS} at {nats_url}")
        try:
            yield observer
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, _START_TIMEOUT_S)

    async def _listen(self, nats_url: str, ready: threading.Event, stop: threading.Event) -> None:
        async with connect(nats_url, "inferq-bench-observer") as nc:
            await nc.subscribe(TOKEN_EVENTS, cb=self._on_event)
            await nc.flush()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)

    async def _on_event(self, msg: Msg) -> None:
        now = time.perf_counter()
        event = json.loads(msg.data)  # plain JSON: the observer must stay cheaper than what it measures
        if event.get("kind") == "tokens" and any(choice.get("text") for choice in event.get("choices", ())):
            self._left_nats[event["request_id"]].append(now)

    def added_latencies(self, results: list[RequestResult]) -> list[float]:
        """Seconds from each token event leaving NATS to its chunk reaching the client."""
        return [
            seen - left
            for result in results
            if result.ok and result.response_id
            for left, seen in zip(self._left_nats.get(result.response_id, ()), result.token_times, strict=False)
        ]
