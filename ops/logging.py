"""structlog setup: JSON lines when not on a TTY, readable console output on one. Request-scoped fields
(request_id, model, worker_id) travel in contextvars so every line of a request carries them."""

from __future__ import annotations

import logging
import re
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

# Bearer credentials and inferq's own key/token formats, wherever they appear in a log line (a library that
# logs request headers at debug level, an exception quoting one) are masked before rendering.
_SECRETS = re.compile(r"(?i)(\bbearer\s+)[^\s'\",;)]+|\biqt?_[0-9a-f]{16,}_[^\s'\",;)]+")


def _redacted(value: object) -> object:
    if isinstance(value, str):
        return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redacted(item) for item in value)
    return value


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if not key.startswith("_"):  # `_record` and friends are structlog's own plumbing
            event_dict[key] = _redacted(value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and route stdlib logging (uvicorn, nats, transformers) through it."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
