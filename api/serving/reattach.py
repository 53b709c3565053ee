"""Getting a request back. A client names the request it wants instead of starting a new one:

- `Last-Event-ID: <request id>/<chunk index>` (the `id:` of the last SSE event it got): the stream continues
  after that chunk, replayed from the token journal by whichever replica the client reached;
- `Idempotency-Key` or `X-Request-Id`: the request's id is derived from the key (and the caller), so a retried
  POST attaches to the request the first one started, running or finished, instead of generating again.

Either way the request must be the caller's: ids carry their owner (api/auth/request_ids.py), and a resume of
another owner's id is refused exactly like an unknown id, before anything is read."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from api.auth.request_ids import keyed_request_id, new_request_id, owns, unknown_request
from api.engine_client import EngineClient, Generation
from api.errors import ApiError
from api.streaming import EventIds
from contracts import ErrorCode, GenerateRequest

LAST_EVENT_ID = "last-event-id"
CLIENT_KEYS = ("idempotency-key", "x-request-id")  # the first one present names the request
MAX_KEY_LENGTH = 255
_REQUEST_ID = re.compile(r"[a-z]+-[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class Reattach:
    owner: str | None = None  # the caller's (None: no caller, e.g. a batch line: nobody can get it back)
    request_id: str | None = None  # the request the client names; None: a new one
    resume_after: int | None = None  # from Last-Event-ID: the last chunk the client has

    def response_id(self, prefix: str) -> str:
        """The named request's id, or a new one bound to the owner (so it can be resumed by the owner only)."""
        return self.request_id or new_request_id(prefix, self.owner)

    def event_ids(self, response_id: str, generations: int) -> EventIds | None:
        """SSE event ids for a stream that can be resumed: one generation's (several interleave by timing, so
        a replay could not number their chunks the same way)."""
        if generations != 1:
            return None
        return EventIds(response_id, after=-1 if self.resume_after is None else self.resume_after)


NEW = Reattach()


def reattach_from(headers: Mapping[str, str], prefix: str, owner: str) -> Reattach:
    """What the request's headers ask for; `prefix` is the endpoint's response id prefix (`chatcmpl`), `owner`
    the caller's (`caller.owner`)."""
    if last := headers.get(LAST_EVENT_ID):
        return _resumed(last, prefix, owner)
    for name in CLIENT_KEYS:
        if key := headers.get(name):
            if len(key) > MAX_KEY_LENGTH:
                raise ApiError(
                    ErrorCode.INVALID_REQUEST, f"{name} is longer than {MAX_KEY_LENGTH} characters", param=name
                )
            # Callers never share a request: the id is a digest of the caller and the key.
            return Reattach(owner, request_id=keyed_request_id(prefix, key, owner))
    return Reattach(owner)


def _resumed(last_event_id: str, prefix: str, owner: str) -> Reattach:
    request_id, _, index = last_event_id.strip().rpartition("/")
    if not (_REQUEST_ID.fullmatch(request_id) and request_id.startswith(f"{prefix}-") and index.isdigit()):
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"Last-Event-ID {last_event_id!r} is not an event id of this endpoint's streams (<{prefix}-…>/<index>)",
            param="Last-Event-ID",
        )
    if not owns(owner, request_id):
        raise unknown_request(request_id)
    return Reattach(owner, request_id=request_id, resume_after=int(index))


async def start(engine: EngineClient, requests: Sequence[GenerateRequest], reattach: Reattach) -> list[Generation]:
    """The generations of `requests`: submitted, attached to (client-named), or resumed (Last-Event-ID)."""
    if reattach.resume_after is None:
        return await engine.submit_all(requests, attach=reattach.request_id is not None)
    if len(requests) != 1:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            "only a stream of one prompt can be resumed by Last-Event-ID",
            param="Last-Event-ID",
        )
    return [await engine.resume(requests[0])]
