"""Connecting to NATS: one lifecycle as an async context manager (reconnect forever, drain on exit)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient

from broker.errors import BrokerUnavailable

if TYPE_CHECKING:
    from common.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How to authenticate to a NATS server that requires it: user/password, an nkey seed file, or a JWT
    `.creds` file; and TLS: a CA to verify the server with, a client certificate to present (mutual TLS).
    Empty: no credentials, plain TCP (the embedded loopback server)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    # Per-user permissions can only keep users out of each other's replies if their inboxes differ.
    inbox_prefix: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsAuth:
        return cls(
            settings.nats_user,
            settings.nats_password,
            settings.nats_nkey_file,
            settings.nats_creds_file,
            settings.nats_inbox_prefix,
            settings.nats_tls_ca_file,
            settings.nats_tls_cert_file,
            settings.nats_tls_key_file,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        """A verifying client context (the server's certificate must chain to `tls_ca_file`, else the system's
        CAs, and match its host name), with our certificate if one is set; None: plain TCP."""
        if self.tls_ca_file is None and self.tls_cert_file is None:
            return None
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.tls_ca_file) if self.tls_ca_file else None
        )
        if self.tls_cert_file is not None:
            context.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file) if self.tls_key_file else None)
        return context

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        options: dict[str, Any] = {}
        if (tls := self.tls_context()) is not None:
            options["tls"] = tls
        if self.user is not None:
            options |= {"user": self.user, "password": self.password or ""}
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = str(self.nkey_seed_file)
        if self.creds_file is not None:
            options["user_credentials"] = str(self.creds_file)
        if self.inbox_prefix is not None:
            options["inbox_prefix"] = self.inbox_prefix
        return options


def _refused_credentials(exc: Exception) -> bool:
    # During the handshake nats-py reports the server's -ERR as a plain Error carrying its text.
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


@asynccontextmanager
async def connect(url: str, name: str, auth: NatsAuth | None = None) -> AsyncIterator[NatsClient]:
    """Connect to `url` (comma-separated for a cluster) and drain the connection on exit."""

    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected and _refused_credentials(exc):
            # nats-py retries a refused login forever (max_reconnect_attempts=-1); raising here ends connect().
            raise BrokerUnavailable(f"the NATS server refused {name}'s credentials: {exc}")
        log.warning("nats.error", error=str(exc), client=name)

    async def on_disconnect() -> None:
        if nc.is_closed or nc.is_draining:  # our own drain at exit
            log.debug("nats.disconnected", client=name)
        else:
            log.warning("nats.disconnected", client=name)

    async def on_reconnect() -> None:
        server = nc.connected_url
        # host and port only: a URL may carry user:password
        log.info("nats.reconnected", client=name, server=f"{server.hostname}:{server.port}" if server else "")

    nc = await nats.connect(
        servers=[server.strip() for server in url.split(",") if server.strip()],
        name=name,
        connect_timeout=5,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        ping_interval=20,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **(auth or NatsAuth()).options(),
    )
    connected = True
    try:
        yield nc
    finally:
        if not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # a drain that fails at shutdown must not mask the real exit path
                log.warning("nats.drain_failed", error=str(exc), client=name)
