"""`inferq api`: serve the edge with uvicorn."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from ops.settings import Settings


def run_api(settings: Settings) -> None:
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                timeout_graceful_shutdown=10)
