"""structlog setup: JSON lines when not on a TTY, readable console output on one. Request-scoped fields
(request_id, model, worker_id) travel in contextvars so every line of a request carries them."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable

import structlog
from structlog.typing import EventDict, WrappedLogger

# Secrets are masked in every log event before it is rendered, whatever their shape or place: a library that logs
# request headers at debug level, uvicorn's line for a WebSocket (its path *with the query string*), an exception
# quoting a URL. Matched: credentials after an auth scheme or in a credential header, inferq's own key and token
# formats, credential-named query/form parameters, and a URL's password. Event fields with a credential's name
# are masked whole. Values configured as secrets (INFERQ_API_KEYS entries, the NATS password) are masked as
# literals, since they may have any shape (`configure_logging(secrets=...)`).
_CREDENTIAL_NAMES = (
    r"api[_-]?key|apikey|x[_-]api[_-]key|key|token|access[_-]?token|refresh[_-]?token|id[_-]?token"
    r"|auth|authorization|password|passwd|pwd|secret|client[_-]?secret|signature|sig|session"
    r"|private[_-]?key|jwt|cookie"
)
_SECRETS = re.compile(
    r"(?i)(\b(?:bearer|basic|digest)\s+)[^\s'\",;)]+"  # an auth scheme and its credential
    r"|((?:proxy-)?authorization|x-api-key|api-key|cookie|set-cookie)(\s*[:=]\s*)[^\r\n'\"]+"  # credential headers
    r"|\biqt?_[0-9a-f]{16,}_[^\s'\",;)]+"  # inferq API keys and login tokens
    rf"|((?<![\w-])(?:{_CREDENTIAL_NAMES})=)[^&\s'\"#;,]+"  # credential query/form parameters
    r"|(://[^:/@\s]+:)[^@\s/]+(?=@)"  # a URL's password
)
_CREDENTIAL_FIELD = re.compile(rf"(?i)(?:{_CREDENTIAL_NAMES}|nats[_-]password|ssh[_-]password)")
MIN_LITERAL_SECRET = 6  # shorter configured values are not masked as literals (they would garble every line)


def _masked(match: re.Match[str]) -> str:
    scheme, header, separator, parameter, url = match.groups()
    if scheme:
        return scheme + "[redacted]"
    if header:
        return header + separator + "[redacted]"
    return (parameter or url or "") + "[redacted]"


class SecretMasker:
    """The structlog processor that masks secrets (above) in every event field, nested values included."""

    def __init__(self, literals: Iterable[str] = ()):
        values = sorted({value for value in literals if len(value) >= MIN_LITERAL_SECRET}, key=len, reverse=True)
        self._literals = re.compile("|".join(map(re.escape, values))) if values else None

    def mask(self, value: object) -> object:
        if isinstance(value, str):
            masked = _SECRETS.sub(_masked, value)
            return self._literals.sub("[redacted]", masked) if self._literals is not None else masked
        if isinstance(value, dict):
            return {key: self._field(key, item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.mask(item) for item in value)
        return value

    def _field(self, name: object, value: object) -> object:
        if isinstance(name, str) and _CREDENTIAL_FIELD.fullmatch(name) and value not in (None, ""):
            return "[redacted]"
        return self.mask(value)

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if not key.startswith("_"):  # `_record` and friends are structlog's own plumbing
                event_dict[key] = self._field(key, value)
        return event_dict


redact_secrets = SecretMasker()  # the shapes alone, for pipelines that know no configured secrets


def configure_logging(level: str = "info", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    """Configure structlog and route stdlib logging (uvicorn, nats, transformers) through it. `secrets`: values
    masked wherever they appear (Settings.secret_values())."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        SecretMasker(secrets),
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
    # uvicorn's own log config (when something ran it with one) gives its loggers their own handlers and stops
    # them propagating: take them back, so their lines pass the masking above like every other line.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
