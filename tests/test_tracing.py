"""OpenTelemetry tracing: one trace per run, with model, tool, approval and message spans."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from keel.client.api import AgentClient
from keel.config import Settings
from keel.plugin import ModelProvider, build_worker
from keel.workflows.models import AgentStatus, MessagePolicy
from tests.agents import TEST_AGENTS
from tests.conftest import Harness, wait_for

pytest.importorskip("opentelemetry.sdk")


async def test_the_span_tree_of_a_run_with_an_approval_and_an_interrupt(
    harness: Harness,
) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from temporalio.client import Client

    from keel.tracing import tracing_plugin

    exporter = InMemorySpanExporter()
    settings = Settings(task_queue=harness.settings.task_queue, tracing="console")
    client = await Client.connect(
        harness.client.service_client.config.target_host,
        data_converter=settings.data_converter(),
        plugins=[tracing_plugin(settings, exporter)],
    )
    agents = AgentClient(client, settings)
    worker = build_worker(
        client,
        settings=settings,
        agents=TEST_AGENTS,
        resources=harness.ledger,
        model=ModelProvider(base_url=harness.model.url, model="scripted"),
    )
    async with worker:
        run = await agents.start("shop", "charge 30", user="tester")
        await wait_for(lambda: _pending(agents, run))
        # an interrupt withdraws the approval and starts a new turn
        await agents.send_message(run, "add 2 and 3", policy=MessagePolicy.INTERRUPT)
        result = await agents.result(run, timeout=30)
    assert result.status == AgentStatus.COMPLETED
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    mine = [s for s in spans if _attr(s, "keel.agent") == "shop" or run in str(s.attributes)]
    assert mine, names
    trace_ids = {s.context.trace_id for s in spans if s.name.endswith("keel.AgentWorkflow")}
    assert len(trace_ids) == 1, names  # one trace for the run
    in_run = [s for s in spans if s.context.trace_id in trace_ids]
    by_name = {}
    for s in in_run:
        by_name.setdefault(s.name, []).append(s)
    models = by_name.get("RunActivity:keel.call_model", [])
    assert len(models) == 3, names  # charge; after the interrupt, add; the answer
    assert all(_attr(s, "keel.model") and _attr(s, "keel.tokens") for s in models)
    assert sorted(_attr(s, "keel.step") for s in models) == [1, 2, 3]
    (tool,) = by_name.get("RunActivity:keel.run_tool", [None])
    assert tool is not None and (_attr(tool, "keel.tool"), _attr(tool, "keel.outcome")) == (
        "add",
        "ok",
    )
    (approval,) = by_name["approval charge"]
    assert _attr(approval, "keel.outcome") == "withdrawn"
    assert approval.end_time > approval.start_time
    (message,) = by_name["message"]
    assert "interrupt" in _attr(message, "keel.outcome")
    assert [link.context.trace_id for link in message.links] != []  # the sender's request
    # the tree: every span of the run hangs under the client's start of the workflow
    ids = {s.context.span_id: s for s in in_run}
    roots = [s for s in in_run if s.parent is None or s.parent.span_id not in ids]
    assert [r.name for r in roots] == ["StartWorkflow:keel.AgentWorkflow"], [
        (s.name, s.parent and s.parent.span_id in ids) for s in in_run
    ]


def _attr(span: object, key: str) -> object:
    return (span.attributes or {}).get(key)  # type: ignore[attr-defined]


async def _pending(agents: AgentClient, run: str) -> object:
    s = await agents.get_state(run)
    return s if s.pending_approvals else None


@pytest.mark.parametrize("provider", ["plain", "replay-safe", "keel"])
async def test_workflow_spans_are_exported_once_whatever_the_tracer_provider(
    harness: Harness, tmp_path: Path, provider: str
) -> None:
    """A worker that keeps no run in its cache replays the run's history at every task: the
    spans Keel's workflow code starts must still be exported once each, and the approval's
    span, started again at each replay, must end. A user's own provider that cannot promise
    that is refused, saying what to use instead."""
    out = await _worker_process(harness, tmp_path, provider)
    if "refused" in out:
        assert provider == "plain", out["refused"]
        assert "create_tracer_provider()" in out["refused"] and "replay" in out["refused"]
        return
    assert out["status"] == AgentStatus.COMPLETED
    # Keel's own: what its workflow code starts (Temporal's spans are its plugin's business)
    keels = [(name, i) for name, i, _ in out["spans"] if name.startswith(("approval", "message"))]
    assert sorted(name for name, _ in keels) == ["approval charge", "message"], out["spans"]
    assert len({i for _, i in keels}) == 2
    assert out["approvals_started"] and set(out["approvals_started"]) == set(out["approvals_ended"])


async def _worker_process(h: Harness, tmp_path: Path, provider: str) -> dict[str, Any]:
    """Run tests/tracing_process.py: a process of its own sets its own tracer provider."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.tracing_process",
        h.client.service_client.config.target_host,
        h.model.url,
        str(tmp_path / "ledger.db"),
        provider,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return result
