"""What route handlers need, built once in the lifespan and handed over by dependency. A route gets them with the
engine client charging its caller's token budget (the meter the auth middleware put on the request), so the
reservation travels with the client the route passes down, not in ambient state."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from api.auth.caller import cache_salt, get_caller
from api.catalog import ModelCatalog
from api.engine_client import EngineClient
from broker.batch_store import BatchStorage
from broker.response_store import ResponseStore
from common.settings import Settings

if TYPE_CHECKING:
    from api.structured import StructuredValidation  # llguidance: imported where constraints are validated


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    catalog: ModelCatalog
    engine: EngineClient
    batches: BatchStorage | None = None  # files, batch jobs and their results (the /v1/files and /v1/batches APIs)
    responses: ResponseStore | None = None  # stored responses of /v1/responses
    cache_salt: str | None = None  # the caller's prefix-cache partition, set on the generations it queues
    structured_validation: StructuredValidation | None = None  # constraints validated here, and its meter


def get_services(connection: HTTPConnection) -> Services:
    services: Services = connection.app.state.services
    meter = getattr(connection.state, "meter", None)
    engine = services.engine if meter is None else services.engine.charging(meter)
    return replace(services, engine=engine, cache_salt=cache_salt(get_caller(connection).owner))


ServicesDep = Annotated[Services, Depends(get_services)]
