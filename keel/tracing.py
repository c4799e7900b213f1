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

Workflow code starts its spans with the process's tracer provider, whoever set it up. One that
is not replay-safe would export them again on every replay and leave an approval open across
a cache eviction unended, so a worker that would use one is refused (`check_provider`), as
Temporal's own OpenTelemetryPlugin refuses it: a provider of your own is built with
`temporalio.contrib.opentelemetry.create_tracer_provider()`, your span processors added to it.
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
        if trace.get_tracer_provider() is not provider:  # OpenTelemetry keeps the first one
            raise SettingsError(
                "KEEL_TRACING: this process already has a tracer provider of its own, which "
                "gets Keel's spans instead: unset KEEL_TRACING, and add Temporal's "
                "OpenTelemetryPlugin to your client (with a provider from create_tracer_provider)"
            )
        _INSTALLED["provider"] = provider
        os.environ.setdefault("OTEL_SERVICE_NAME", "keel")
    return OpenTelemetryPlugin(add_temporal_spans=True)


def provider_refusal(provider: Any) -> str:
    """Why workflow code must not start spans with this tracer provider ('' when it may):
    it records spans, and is not Temporal's replay-safe provider."""
    from opentelemetry import trace

    if isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider):
        return ""  # none set up: spans are not recorded
    try:
        from temporalio.contrib.opentelemetry import ReplaySafeTracerProvider

        if isinstance(provider, ReplaySafeTracerProvider):
            return ""
    except ImportError:  # without opentelemetry-sdk, no provider is replay-safe
        pass
    return (
        f"this process's OpenTelemetry tracer provider ({type(provider).__name__}) is not "
        "replay-safe, and Keel's workflow code starts spans with it (each approval, each "
        "message): every replay of a run would export them again, and an approval open when "
        "the worker's cache evicts the run would never end. Build the provider with "
        "temporalio.contrib.opentelemetry.create_tracer_provider() and add your span "
        "processors to it (or set KEEL_TRACING and set none)"
    )


def check_provider() -> None:
    """Refuse, before a worker or replayer runs Keel's workflows, a tracer provider whose spans
    started in workflow code would not be replay-safe (see the module's docstring)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return  # without OpenTelemetry, workflow code starts no spans
    refusal = provider_refusal(trace.get_tracer_provider())
    if refusal:
        raise ValueError(refusal)
