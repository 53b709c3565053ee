"""How the edge is wired: a route's engine client charges its caller's meter (handed over explicitly, no ambient
state), and the stream framing sits below the serving code (it imports none of it)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from starlette.requests import Request

from api.services import Services, get_services


class Engine:
    def __init__(self, meter: object = None) -> None:
        self.meter = meter

    def charging(self, meter: object) -> Engine:
        return Engine(meter)


def connection(state: dict) -> Request:
    services = Services(settings=None, catalog=None, engine=Engine())  # type: ignore[arg-type]
    app = SimpleNamespace(state=SimpleNamespace(services=services))
    return Request({"type": "http", "app": app, "state": state, "headers": []})


def test_a_route_gets_the_engine_client_charging_its_callers_meter() -> None:
    meter = object()
    assert get_services(connection({"meter": meter})).engine.meter is meter


def test_without_a_meter_the_shared_services_are_handed_over_as_they_are() -> None:
    request = connection({})
    assert get_services(request) is request.app.state.services


def test_the_framing_modules_import_nothing_from_serving() -> None:
    probe = (
        "import sys, api.streaming, api.disconnects; "
        "print(sorted(name for name in sys.modules if name.startswith('api.serving')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
