"""`inferq api`: serve the edge with uvicorn."""

from __future__ import annotations

import asyncio

import structlog
import uvicorn

from api.app import create_app
from api.bind_safety import UnsafeBind, check_bind
from common.process import EXIT_CONFIG
from common.settings import Settings

log = structlog.get_logger(__name__)


def run_api(settings: Settings) -> int | None:
    try:
        asyncio.run(check_bind(settings))
    except UnsafeBind as exc:
        # EXIT_CONFIG tells `inferq serve` (and systemd's RestartPreventExitStatus) not to start us again as is.
        log.critical("api.unsafe_bind", reason=str(exc))
        return EXIT_CONFIG
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=10
    )
    return None
