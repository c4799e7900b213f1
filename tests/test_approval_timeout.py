"""Approval expiry on durable timers, 24 hours passed in seconds on the time-skipping server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from keel.client.api import AgentClient, KeelClientError
from keel.config import Settings
from keel.demo.agent import Ledger
from keel.plugin import ModelProvider, build_worker, ensure_search_attributes
from keel.testing.model_server import ScriptedModelServer
from keel.workflows.models import AgentStatus, RunState
from tests.agents import TEST_AGENTS
from tests.conftest import binary, wait_for


@pytest_asyncio.fixture(loop_scope="session")
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    ) as env:
        await ensure_search_attributes(env.client)
        yield env


async def _waiting(agents: AgentClient, run: str) -> RunState | None:
    s = await agents.get_state(run)
    return s if s.pending_approvals else None


@pytest.mark.parametrize(
    ("agent", "expected"),
    [("shop-open", AgentStatus.IDLE), ("shop-strict", AgentStatus.CANCELLED)],
)
async def test_approval_expires_and_policy_applies(
    skipping: WorkflowEnvironment,
    model: ScriptedModelServer,
    ledger: Ledger,
    agent: str,
    expected: AgentStatus,
) -> None:
    settings = Settings(task_queue=f"tq-{uuid.uuid4().hex[:8]}")
    agents = AgentClient(skipping.client, settings)
    worker = build_worker(
        skipping.client,
        settings=settings,
        agents=TEST_AGENTS,
        resources=ledger,
        model=ModelProvider(base_url=model.url, model="scripted"),
    )
    async with worker:
        run = await agents.start(agent, "charge 30", run_id=f"t-{uuid.uuid4().hex[:8]}")
        with skipping.auto_time_skipping_disabled():
            state = await wait_for(lambda: _waiting(agents, run))
        call_id = state.pending_approvals[0].call_id
        await skipping.sleep(timedelta(hours=25))  # the expiry timer fires, no wall time spent
        handle: WorkflowHandle = skipping.client.get_workflow_handle(run)
        with skipping.auto_time_skipping_disabled():
            try:
                state = await wait_for(lambda: _status_in(agents, run, {expected}), timeout=30)
            except TimeoutError:
                print((await agents.get_state(run)).model_dump_json(indent=1))
                print(await skipping.get_current_time())
                raise
        assert [a.kind for a in state.audit if a.call_id == call_id][:1] == ["expired"]
        assert ledger.rows("refunds") == []
        if expected == AgentStatus.IDLE:
            # the model saw the expiry as a rejection, and a late decision is refused
            assert (
                state.final_answer
                == "The tool reported: Rejected: no approval for charge before it expired."
            )
            with pytest.raises(KeelClientError, match="expired"):
                await agents.approve(run, call_id, "alice")
            await handle.cancel()
        else:
            assert "expired" in (state.error or "")
            # Temporal's own status does not call it a success
            with skipping.auto_time_skipping_disabled():
                result = await agents.result(run, timeout=30)
                described = await handle.describe()
            assert result.status == AgentStatus.CANCELLED
            assert described.status == WorkflowExecutionStatus.FAILED


async def _status_in(agents: AgentClient, run: str, statuses: set[AgentStatus]) -> RunState | None:
    s = await agents.get_state(run)
    return s if s.status in statuses else None
