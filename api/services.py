"""What route handlers need, built once in the lifespan and handed over by dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from api.catalog import ModelCatalog
from api.engine_client import EngineClient
from broker.batch_store import BatchStorage
from broker.response_store import ResponseStore
from ops.settings import Settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    catalog: ModelCatalog
    engine: EngineClient
    batches: BatchStorage | None = None  # files, batch jobs and their results (the /v1/files and /v1/batches APIs)
    responses: ResponseStore | None = None  # stored responses of /v1/responses


def get_services(connection: HTTPConnection) -> Services:
    return connection.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
