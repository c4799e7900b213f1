"""Prometheus metrics: Temporal's SDK metrics and Keel's own, on one endpoint."""

from __future__ import annotations

import re
import socket
import urllib.request

from keel.client.api import AgentClient
from keel.config import Settings, connect
from keel.metrics import publish_run_counts
from keel.plugin import ModelProvider, build_worker
from keel.workflows.models import AgentStatus
from tests.agents import TEST_AGENTS
from tests.conftest import Harness, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_a_run_shows_in_the_metrics(harness: Harness) -> None:
    port = _free_port()
    settings = Settings(
        address=harness.client.service_client.config.target_host,
        task_queue=harness.settings.task_queue,
        metrics_port=port,
    )
    client = await connect(settings)
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
        state = await wait_for(lambda: _pending(agents, run))
        await agents.approve(run, state.pending_approvals[0].call_id, "alice")
        result = await agents.result(run, timeout=30)
        assert result.status == AgentStatus.COMPLETED
        counts = await wait_for(lambda: _gauge_set(client, port))
        text = _scrape(port)
    assert _value(text, "keel_model_steps_total", agent="shop") == 2
    assert _value(text, "keel_runs_ended_total", agent="shop", status="completed") == 1
    assert _value(text, "keel_approval_wait_count", agent="shop", outcome="approved") == 1
    assert _value(text, "keel_model_requests_total", agent="shop", outcome="ok") == 2
    assert _value(text, "keel_model_tokens_total", agent="shop", kind="prompt") > 0
    assert _value(text, "keel_model_latency_count", agent="shop") == 2
    assert _value(text, "keel_tool_calls_total", agent="shop", tool="charge", outcome="ok") == 1
    # Temporal's own, on the same endpoint
    assert "temporal_workflow_completed_total" in text
    assert "keel_runs" in counts


async def _pending(agents: AgentClient, run: str) -> object:
    s = await agents.get_state(run)
    return s if s.pending_approvals else None


async def _gauge_set(client: object, port: int) -> str | None:
    import asyncio

    task = asyncio.create_task(publish_run_counts(client, every=3600))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0)
        text = await wait_for(lambda: "keel_runs{" in _scrape(port) and _scrape(port), timeout=10)
    finally:
        task.cancel()
    return text
