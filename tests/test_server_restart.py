"""A run waiting for approval survives a restart of the Temporal server itself."""

from __future__ import annotations

import socket
from pathlib import Path

from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from keel.client.api import AgentClient
from keel.demo.agent import Ledger
from keel.dev import dev_server_args
from keel.testing.model_server import ScriptedModelServer
from keel.workflows.models import SEARCH_ATTRIBUTES, AgentState, AgentStatus
from tests.conftest import Harness, binary, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(db: Path, port: int) -> WorkflowEnvironment:
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        dev_server_database_filename=str(db),
        dev_server_extra_args=dev_server_args(),  # WAL: a killed server process loses nothing
        port=port,
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
    )


async def test_approval_wait_survives_server_restart(
    tmp_path: Path, model: ScriptedModelServer, ledger: Ledger
) -> None:
    db, port = tmp_path / "temporal.db", free_port()
    env = await start_server(db, port)
    try:
        h = Harness(env, model, ledger)
        async with h.running():
            run = await h.start("shop", "charge 30")
            state: AgentState = await wait_for(lambda: _pending(h.agents, run))
    finally:
        await env.shutdown()

    env = await start_server(db, port)  # same file: the history is still there
    try:
        agents = AgentClient(env.client, h.settings)
        h2 = Harness(env, model, ledger)
        h2.settings, h2.agents = h.settings, agents
        async with h2.running():
            await agents.approve(run, state.pending_approvals[0].call_id, "alice")
            result = await agents.result(run, timeout=60)
        handle: WorkflowHandle = env.client.get_workflow_handle(run)
        described = await handle.describe()
        history = await handle.fetch_history()
    finally:
        await env.shutdown()
    assert result.status == AgentStatus.COMPLETED
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert [r["amount"] for r in ledger.rows("refunds")] == [30]
    # one run, whose history from before the restart goes on after it
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled == ["keel.call_model", "keel.run_tool", "keel.call_model"]


async def _pending(agents: AgentClient, run: str) -> AgentState | None:
    s = await agents.get_state(run)
    return s if s.pending_approvals else None
