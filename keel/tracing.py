"""OpenTelemetry tracing, through Temporal's own `temporalio.contrib.opentelemetry`.

`KEEL_TRACING=otlp` (spans to `OTEL_EXPORTER_OTLP_ENDPOINT`, the OpenTelemetry standard
variables apply) or `console`, on every worker and client (install `keel[otel]`). Each run
is one trace: Temporal's plugin makes spans for starting and running the workflow, each
activity (the model step's span carries `keel.model`, `keel.tokens`, `keel.attempt`; a tool
call's `keel.tool`, `keel.outcome`), signals, updates and queries, and Keel adds the spans
only the workflow sees: each approval from request to decision (`keel.by`,
`keel.outcome`) and each message (an interrupt shows as one). The tracer provider is Temporal's
replay-safe one (span ids derive from the run), so a trace survives a worker's crash (spans
are ended once, by whichever worker finishes them) and continue-as-new.
"""

from __future__ import annotations

import os
from typing import Any

from keel.config import Settings, SettingsError

_INSTALLED: dict[str, Any] = {}  # the process's provider: set once (OpenTelemetry's rule)


def tracing_plugin(settings: Settings, exporter: Any = None) -> Any:
    """Temporal's OpenTelemetry plugin, with a replay-safe tracer provider installed as the
    global one (once per process). `exporter`: a span exporter of your own (tests use an
    in-memory one); otherwise the settings' `KEEL_TRACING` picks it."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
        from temporalio.contrib.opentelemetry import OpenTelemetryPlugin, create_tracer_provider
    except ImportError as e:
        raise SettingsError(
            f"KEEL_TRACING needs OpenTelemetry: pip install 'keel[otel]' ({e})"
        ) from None
    if "provider" not in _INSTALLED:
        provider = create_tracer_provider()
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.tracing == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif settings.tracing == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                raise SettingsError(
                    "KEEL_TRACING=otlp needs the OTLP exporter: pip install 'keel[otel]'"
                ) from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            raise SettingsError(f"KEEL_TRACING is otlp or console, not {settings.tracing!r}")
        trace.set_tracer_provider(provider)
        _INSTALLED["provider"] = provider
        os.environ.setdefault("OTEL_SERVICE_NAME", "keel")
    return OpenTelemetryPlugin(add_temporal_spans=True)
