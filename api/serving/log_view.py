"""What a deployment's log stream shows to someone who is not an admin (its client owner, a monitor). A deployed
worker pulls from its model's shared queue, so it serves every owner's requests, and its raw output names them;
it also names the machine (NATS URL, addresses, install paths). The tenant view keeps what tells how the
deployment is doing and drops or masks the rest:

- a worker's JSON log line that concerns a request (it has a request or trace id, or its event is `request.*`)
  is dropped whole: it is some owner's traffic, ids, token counts and timings;
- other JSON lines keep only fields known to be about the worker itself (event, level, time, model, ...);
- any text left (an agent note, a traceback, a field value) has URLs, network addresses, filesystem paths and
  request-id-shaped strings masked.

Admins get the raw lines."""

from __future__ import annotations

import json
import re

_REQUEST_FIELDS = frozenset({"request_id", "trace_id", "span_id", "batch_id", "custom_id", "line", "prompt", "text"})
_REQUEST_EVENTS = ("request.", "intake.", "batch.")
_KEPT_FIELDS = (
    "timestamp",
    "level",
    "event",
    "logger",
    "model",
    "worker_id",
    "capacity",
    "device",
    "dtype",
    "max_model_len",
    "kv_cache_tokens",
    "layers",
    "width",
    "status",
    "error",
)
_MASKS = (
    (re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE), "<url>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\[?(?:[0-9a-f]{1,4}:)*(?:[0-9a-f]{1,4})?::(?:[0-9a-f]{1,4}:?)*\]?", re.IGNORECASE), "<address>"),
    (re.compile(r"\b[A-Za-z][\w.-]*:\d{2,5}\b"), "<address>"),
    (re.compile(r"(?<![\w.])~?(?:/[^\s/'\",:;()\[\]]+){2,}/?"), "<path>"),
    (re.compile(r"\b[a-z]+(?:[_-][a-z]+)*-[0-9a-f]{32}\b"), "<request>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
)


def scrub(text: str) -> str:
    """`text` with URLs, network addresses, filesystem paths and request ids masked."""
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text


def tenant_line(content: str) -> str | None:
    """A log line as a non-admin sees it, or None when it is another owner's business (dropped)."""
    try:
        entry = json.loads(content)
    except ValueError:
        return scrub(content)
    if not isinstance(entry, dict):
        return scrub(content)
    if _REQUEST_FIELDS & entry.keys() or str(entry.get("event", "")).startswith(_REQUEST_EVENTS):
        return None
    kept = {name: entry[name] for name in _KEPT_FIELDS if name in entry}
    return json.dumps(
        {
            name: scrub(value) if isinstance(value, str) and name != "timestamp" else value
            for name, value in kept.items()
        }
    )
