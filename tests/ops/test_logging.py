"""The logging pipeline masks secrets whatever their shape or place (issue 23): auth schemes, credential headers,
inferq keys, credential-named query parameters (a key in a WebSocket URL, which uvicorn logs with its query
string), URL passwords, credential-named fields, and the values configured as secrets (INFERQ_API_KEYS entries
of any shape, the NATS password), which `inferq` hands to the pipeline from its settings."""

from __future__ import annotations

import argparse
import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from common.logging import SecretMasker
from common.settings import Settings
from ops.cli import _configure_logging_from

ENV_KEY = "plain-env-key-of-any-shape"  # no prefix, no scheme: only known because it is configured


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('127.0.0.1:5555 - "WebSocket /v1/chat/completions?api_key=sk-live-abc123" 403', "sk-live-abc123"),
        ("GET /v1/models?foo=1&access_token=tok-9f8e7d&bar=2", "tok-9f8e7d"),
        ("GET /stream?token=abc.def.ghi", "abc.def.ghi"),
        ("/v1/completions?key=k3y-v4lue", "k3y-v4lue"),
        ("> Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("> X-Api-Key: some-header-key", "some-header-key"),
        ("sending Authorization: Bearer xyz-opaque", "xyz-opaque"),
        ("cannot reach nats://inferq:n4ts-pw@10.0.0.5:4222", "n4ts-pw"),
        ("key iq_0123456789abcdef_s3cr3t-part in a message", "s3cr3t-part"),
    ],
)
def test_secret_shapes_are_masked(text: str, secret: str) -> None:
    masked = SecretMasker().mask(text)
    assert secret not in masked and "[redacted]" in masked


def test_ordinary_text_is_left_alone() -> None:
    text = "a valid API key or login token is required; served http://127.0.0.1:8000/v1/models in 12:30"
    assert SecretMasker().mask(text) == text


def test_credential_named_fields_and_configured_values_are_masked() -> None:
    masker = SecretMasker([ENV_KEY, "short"])
    event = masker(
        None,
        "info",
        {
            "event": f"refused ?k={ENV_KEY}",
            "password": "hunter2!",
            "headers": {"X-Api-Key": "abc", "accept": "json"},
            "key_id": "0123",
        },
    )
    assert event == {
        "event": "refused ?k=[redacted]",
        "password": "[redacted]",
        "headers": {"X-Api-Key": "[redacted]", "accept": "json"},
        "key_id": "0123",
    }
    assert masker.mask("short words stay") == "short words stay"  # too short to mask as a literal


@pytest.fixture
def restored_logging() -> Iterator[None]:
    saved_structlog, root = structlog.get_config(), logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    try:
        yield
    finally:
        structlog.configure(**saved_structlog)
        root.handlers[:], level = saved_root
        root.setLevel(level)


def test_the_cli_masks_the_configured_keys_and_nats_password(restored_logging) -> None:
    settings = Settings(
        api_keys=f"client:{ENV_KEY},admin-key-without-role", nats_password="the-nats-password", log_format="json"
    )
    _configure_logging_from(argparse.ArgumentParser(), lambda: settings)
    output = io.StringIO()
    logging.getLogger().handlers[0].setStream(output)
    logging.getLogger("uvicorn.error").warning('1.2.3.4 - "WebSocket /v1/completions?k=%s" 403', ENV_KEY)
    structlog.get_logger("x").warning("connect failed", detail="admin-key-without-role / the-nats-password")
    text = output.getvalue()
    assert "uvicorn.error" in text or "WebSocket" in text
    for secret in (ENV_KEY, "admin-key-without-role", "the-nats-password"):
        assert secret not in text, text
