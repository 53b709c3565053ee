"""OpenTelemetry tracing for one process (the api or a worker), configured by `Settings.otel_exporter`: `none` (the
default) gives no tracer at all, so the hot paths skip span work; `console` prints finished spans; `otlp` sends
them over OTLP/HTTP to `otel_endpoint`. Each process owns its TracerProvider and hands the tracer down
explicitly: nothing is set globally, so several apps in one test process do not fight over it."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import Tracer

from common.settings import Settings

INSTRUMENTATION = "inferq"


def span_processor(settings: Settings) -> SpanProcessor | None:
    """Where finished spans go; None when tracing is off."""
    if settings.otel_exporter == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter())
    if settings.otel_exporter == "otlp":
        # Imported only when used: the exporter pulls in protobuf.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_endpoint))
    return None


@dataclass(frozen=True, slots=True)
class Tracing:
    tracer: Tracer | None  # None: tracing is off
    provider: TracerProvider | None = None

    def shutdown(self) -> None:
        """Flush what is buffered (the OTLP exporter batches) and stop exporting."""
        if self.provider is not None:
            self.provider.shutdown()


def open_tracing(settings: Settings, service_name: str) -> Tracing:
    processor = span_processor(settings)
    if processor is None:
        return Tracing(None)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(processor)
    return Tracing(provider.get_tracer(INSTRUMENTATION), provider)
