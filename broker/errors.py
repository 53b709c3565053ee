"""Broker failures as our own exception types, so callers never catch nats-py's classes."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class: the broker could not do what was asked."""


class QueueFull(BrokerError):
    """The model's work queue is at its cap (JetStream err 10077)."""

    def __init__(self, model: str, depth: int | None = None):
        super().__init__(f"the queue for model {model!r} is full")
        self.model = model
        self.depth = depth


class QueueMissing(BrokerError):
    """No stream is bound to the model's subject: no worker ever served it."""


class MessageTooLarge(BrokerError):
    """The request exceeds the server's payload or message size limit."""


class BrokerUnavailable(BrokerError):
    """NATS did not answer in time or the connection is closed."""
