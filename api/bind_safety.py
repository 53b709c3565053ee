"""Refuse to serve anonymous admins to a network. With auth `auto` and no credential anywhere (no
INFERQ_API_KEYS, no key or user in NATS), every caller is an admin who can deploy workers, open SSH sessions and
read every batch; on loopback that is the single-user start, on any other address it is how unauthenticated
Ray and Jupyter servers were taken over. So an api bound elsewhere starts only with a credential, with
`INFERQ_AUTH=on`, or with the explicit `INFERQ_AUTH=off`.

Refusing, rather than generating a key and printing it once (Jupyter's token): a generated key printed by one
of `inferq serve`'s children is easily lost in its log, and would have to be stored so that restarts and other
replicas agree on it; a refusal leaves nothing half-open and says exactly what to set."""

from __future__ import annotations

import ipaddress

from broker.accounts import AccountStore
from broker.connection import NatsAuth, connect
from common.settings import Settings


class UnsafeBind(Exception):
    """The api would serve anonymous admins on a network address."""


def is_loopback(host: str) -> bool:
    """Only addresses that cannot be reached from another machine. A hostname other than `localhost` may resolve
    to anything, and a wildcard (`0.0.0.0`, `::`, empty) listens on every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def needs_credential_check(settings: Settings) -> bool:
    return settings.auth == "auto" and not settings.api_keys and not is_loopback(settings.host)


async def check_bind(settings: Settings) -> None:
    """Raise `UnsafeBind` if this api would be open to anonymous admins on a non-loopback address."""
    if not needs_credential_check(settings):
        return
    assert settings.nats_url is not None
    async with connect(settings.nats_url, "inferq-api-bind-check", NatsAuth.from_settings(settings)) as nc:
        store = await AccountStore.open(nc.jetstream(), settings.nats_replicas)
        if await store.auth_enabled():  # a key or user exists: auth is on
            return
    raise UnsafeBind(
        f"refusing to listen on {settings.host}:{settings.port} without authentication: every caller would be an "
        "admin. Set INFERQ_API_KEYS=<a long random secret> (or create a key with `inferq keys create` and set "
        "INFERQ_AUTH=on), bind to 127.0.0.1, or set INFERQ_AUTH=off if this network is really trusted."
    )
