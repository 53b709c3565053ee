"""How the edge is wired: a route's engine client charges its caller's meter (handed over explicitly, no ambient
state), and the stream framing sits below the serving code (it imports none of it)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from starlette.requests import Request

from api.auth.caller import ANONYMOUS, Caller, cache_salt
from api.services import Services, get_services
from contracts.accounts import Role


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


def test_without_a_meter_the_shared_engine_client_is_handed_over_as_it_is() -> None:
    request = connection({})
    assert get_services(request).engine is request.app.state.services.engine


def test_a_route_gets_its_callers_prefix_cache_salt() -> None:
    """Generations are salted with a digest of the caller's owner (issue #18): same owner, same salt; another
    owner, another; the owner itself is not on the wire."""
    owners = [Caller(owner=owner, role=Role.CLIENT, name="n") for owner in ("key:a", "key:a", "key:b")]
    salts = [get_services(connection({"caller": caller})).cache_salt for caller in owners]
    assert salts[0] == salts[1] != salts[2] and all(salt and "key:" not in salt for salt in salts)
    assert get_services(connection({})).cache_salt == cache_salt(ANONYMOUS.owner)  # auth off: one principal


def test_the_framing_modules_import_nothing_from_serving() -> None:
    probe = (
        "import sys, api.streaming, api.disconnects; "
        "print(sorted(name for name in sys.modules if name.startswith('api.serving')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
