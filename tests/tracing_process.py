"""A user's worker process with an OpenTelemetry tracer provider of its own (tests/test_tracing.py).

    python -m tests.tracing_process ADDRESS MODEL_URL LEDGER PROVIDER

PROVIDER is `plain` (the SDK's TracerProvider, as an application sets one up),
`replay-safe` (Temporal's `create_tracer_provider`, with Temporal's OpenTelemetryPlugin on
the client) or `keel` (the one KEEL_TRACING installs). The process runs a run of `shop` through an approval and a message on a worker that
keeps no run in its cache, so every workflow task replays the run's history, and prints, as JSON,
either why the worker was refused or the spans: each one exported, and the approval spans
started and ended (by span id). A process of its own: the tracer provider is set once per
process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.contrib.opentelemetry import OpenTelemetryPlugin, create_tracer_provider
from temporalio.worker import Worker

from keel.client.api import AgentClient
from keel.config import Settings
from keel.demo.agent import Ledger
from keel.plugin import KeelPlugin, ModelProvider
from keel.tracing import tracing_plugin
from tests.agents import TEST_AGENTS


class Approvals(SpanProcessor):
    """The approval spans started and ended, by span id."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.ended: list[int] = []

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        if span.name.startswith("approval"):
            self.started.append(span.context.span_id)

    def on_end(self, span: ReadableSpan) -> None:
        if span.name.startswith("approval") and span.context is not None:
            self.ended.append(span.context.span_id)


async def main(address: str, model_url: str, ledger: str, kind: str) -> dict[str, Any]:
    exporter, approvals = InMemorySpanExporter(), Approvals()
    settings = Settings(task_queue=f"tq-{uuid.uuid4().hex[:8]}", tracing="console")
    if kind == "keel":
        tracing = [tracing_plugin(settings, exporter)]
        provider: Any = trace.get_tracer_provider()
    else:
        provider = TracerProvider() if kind == "plain" else create_tracer_provider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        tracing = [OpenTelemetryPlugin(add_temporal_spans=True)] if kind != "plain" else []
    provider.add_span_processor(approvals)
    keel = KeelPlugin(
        TEST_AGENTS,
        resources=Ledger(ledger),
        model=ModelProvider(base_url=model_url, model="scripted"),
        settings=settings,
    )
    client = await Client.connect(address, plugins=[keel, *tracing])
    try:
        worker = Worker(client, task_queue=settings.task_queue, max_cached_workflows=0)
    except ValueError as e:
        return {"refused": str(e)}
    agents = AgentClient(client, settings)
    async with worker:
        run = await agents.start("shop", "charge 30", user="tester")
        while not (state := await agents.status(run)).pending_approvals:
            await asyncio.sleep(0.1)
        await agents.send_message(run, "and a note")  # queued behind the approval
        await agents.approve(run, state.pending_approvals[0].call_id, "alice")
        result = await agents.result(run, timeout=60)
    return {
        "status": result.status.value,
        "spans": [
            (s.name, s.context.span_id, (s.attributes or {}).get("keel.call_id", ""))
            for s in exporter.get_finished_spans()
            if s.context is not None
        ],
        "approvals_started": approvals.started,
        "approvals_ended": approvals.ended,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))), flush=True)
    os._exit(0)  # the temporalio native runtime can abort in interpreter exit hooks
