"""Trace context across NATS: the edge puts the W3C `traceparent` (and `tracestate`) of its current span into a
request's message headers; the worker takes it out again, so its spans join the edge's trace. Uses the W3C
propagator directly rather than OpenTelemetry's global one, so nothing here depends on process-wide setup."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()


def trace_headers(context: Context | None = None) -> dict[str, str]:
    """`{"traceparent": …}` for the current span (or `context`'s); empty when there is no recording trace."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context | None:
    """The remote parent carried in `headers`, or None when they carry no valid trace context."""
    if not headers:
        return None
    context = _W3C.extract(_lowercased(headers))
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def trace_id_of(context: Context | None = None) -> str | None:
    """The 32-hex-digit trace id of the current span (or `context`'s), as log lines carry it."""
    span_context = trace.get_current_span(context).get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None


def _lowercased(headers: Mapping[str, str]) -> dict[str, str]:
    # NATS headers keep the case they were sent with; the propagator looks up `traceparent` exactly.
    return {key.lower(): value for key, value in headers.items()}
