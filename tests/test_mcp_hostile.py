"""A hostile MCP server (tests/mcp_servers/hostile.py, streamable HTTP in a process of its
own): nothing runs that may not, no call runs twice (its ledger is keyed by the idempotency
key in each request's `_meta`), and every run ends with a clear status."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from keel.config import Settings
from keel.plugin import KeelPlugin
from keel.testing import AgentEnvironment
from keel.workflows.inbox import INTERRUPTED
from keel.workflows.models import AgentStatus, AuditKind, Policy, PolicyAgent
from tests.conftest import wait_for
from tests.mcp_servers.agents import MCP_RULES, HostileServer, hostile_agent
from tests.mcp_servers.hostile import Ledger

TOKEN = "hostile-token-5f1e9c"  # what the worker's environment holds (never the history)


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_TOKEN", TOKEN)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HostileServer]:
    s = HostileServer(tmp_path / "hostile.db")
    yield s
    s.stop()


async def up(s: HostileServer, **options: bool | int) -> Ledger:
    s.start(**options)  # type: ignore[arg-type]
    await wait_for(s.listening, timeout=60)
    return Ledger(s.ledger)


async def test_a_huge_result_is_truncated_and_the_run_completes(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    await up(server)
    async with AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES) as e:
        result = await e.run("mark", "show me something huge", timeout=120)
    assert result.status == AgentStatus.COMPLETED
    assert "more characters truncated" in (result.final_answer or "")
    assert len(result.final_answer or "") < 110_000


async def test_a_lying_schema_the_pinned_one_checks_the_server_answers(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    """The call fits the schema the run pinned; the server's own error reaches the model."""
    await up(server)
    async with AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES) as e:
        result = await e.run("mark", "count to three", timeout=120)
    assert result.status == AgentStatus.COMPLETED
    assert (result.final_answer or "").startswith("The tool reported: Error:")
    assert "validation error for lyingArguments" in (result.final_answer or "")


async def test_a_result_cannot_make_a_forbidden_tool_run(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    ledger = await up(server)
    policy = Policy(agents={"mark": PolicyAgent(tools=["hostile_poison", "hostile_huge"])})
    agents = [hostile_agent(server.url)]
    async with AgentEnvironment(env.client, agents, MCP_RULES, policy=policy) as e:
        run = await e.start("mark", "read the document")
        result = await e.agents.result(run, timeout=120)
        state = await e.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert "not allowed" in (result.final_answer or "")
    assert [a.kind for a in state.audit if a.kind == AuditKind.TOOL_REFUSED] == [
        AuditKind.TOOL_REFUSED
    ]
    assert state.spec is not None and state.spec.tool("hostile_wipe") is None  # never offered
    assert ledger.events("wiped") == []


async def test_a_server_that_dies_mid_call_is_retried_and_charges_once(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    ledger = await up(server, crash=True)
    async with AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES) as e:
        run = await e.start("mark", "charge 5")
        await wait_for(lambda: ledger.events("crash"), timeout=60)
        proc = server.proc
        assert proc is not None
        await wait_for(lambda: proc.poll() is not None)
        assert proc.returncode == 17  # it died mid-call, the effect kept
        await up(server)  # back, without the crash: the retry finds the kept result
        result = await e.agents.result(run, timeout=180)
        state = await e.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    (key,) = ledger.effects()
    (effect,) = state.effects
    assert effect.idempotency_key == key and '"charged": 5.0' in effect.result


async def test_a_changed_tool_list_is_seen_by_the_next_run_only(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    await up(server)
    async with AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES) as e:
        first = await e.start("mark", "count to three")
        await e.agents.result(first, timeout=120)
        server.stop()
        await up(server, version=2)
        second = await e.start("mark", "use the new tool")
        answer = await e.agents.result(second, timeout=120)
        before, after = await e.agents.get_state(first), await e.agents.get_state(second)
        history = await e.client.get_workflow_handle(first).fetch_history()
    assert answer.final_answer == "Done: extra"
    assert before.spec is not None and after.spec is not None
    assert before.spec.mcp[0].digest != after.spec.mcp[0].digest
    assert "hostile_extra" not in before.spec.mcp[0].tools
    assert "hostile_extra" in after.spec.mcp[0].tools
    server.stop()  # the first run replays with its own list, no server asked
    replayer = Replayer(workflows=[], plugins=[KeelPlugin(settings=Settings())])
    await replayer.replay_workflow(history)


async def test_a_slow_call_heartbeats_and_an_interrupt_cancels_it(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    ledger = await up(server)
    async with AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES) as e:
        run = await e.start("mark", "be slow")
        await wait_for(lambda: ledger.events("slow started"), timeout=60)
        handle = e.client.get_workflow_handle(run)
        await wait_for(lambda: _heartbeat_seen(handle), timeout=60)
        await e.agents.send_message(run, "say hello", "interrupt")
        result = await e.agents.result(run, timeout=120)
        state = await e.agents.get_state(run)
    assert result.final_answer == "Hello!"
    assert any(m.role == "tool" and m.content == INTERRUPTED for m in state.transcript)


async def _heartbeat_seen(handle: object) -> bool:
    described = await handle.describe()  # type: ignore[attr-defined]
    return any(
        a.HasField("last_heartbeat_time") for a in described.raw_description.pending_activities
    )


async def test_a_worker_sigkilled_mid_call_is_replaced_and_charges_once(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    """The server keeps the effect and never answers; the worker dies; a new one's retry
    carries the same key, and gets the kept result."""
    ledger = await up(server, hold=True)
    e = AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES)
    e.model.start()  # the environment's own worker is started only after the kill
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "tests.mcp_servers.worker"),
            *("--address", e.client.service_client.config.target_host),
            *("--task-queue", e.settings.task_queue),
            *("--model-url", e.model.url),
            *("--mcp-url", server.url),
            cwd=os.getcwd(),
        )
        try:
            run = await e.start("mark", "charge 9")
            await wait_for(lambda: ledger.events("holding"), timeout=120)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        async with e.worker():
            result = await e.agents.result(run, timeout=180)
            state = await e.agents.get_state(run)
    finally:
        e.model.stop()
    assert result.status == AgentStatus.COMPLETED
    (key,) = ledger.effects()
    assert [x.idempotency_key for x in state.effects] == [key]


async def test_a_secret_by_reference_is_sent_and_never_shown(
    env: WorkflowEnvironment, server: HostileServer
) -> None:
    await up(server)
    async with AgentEnvironment(env.client, [hostile_agent(server.url)], MCP_RULES) as e:
        run = await e.start("mark", "show your credentials")
        result = await e.agents.result(run, timeout=120)
        history = await e.client.get_workflow_handle(run).fetch_history()
    assert result.final_answer == "Done: called with Authorization: Bearer [secret HOSTILE_TOKEN]"
    assert TOKEN not in history.to_json()
