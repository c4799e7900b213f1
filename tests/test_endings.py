"""Every way a run ends leaves its own record (`get_state`), its `AgentStatus` search
attribute and Temporal's status in agreement; no ending but success looks like one."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus

from keel.workflows.models import AGENT_STATUS, AgentStatus
from tests.conftest import Harness

T = WorkflowExecutionStatus
ENDINGS: list[tuple[str, str, str, list[dict[str, Any]], AgentStatus, T]] = [
    ("completed", "calc", "say hello", [], AgentStatus.COMPLETED, T.COMPLETED),
    ("bad request", "calc", "say hello", [{"kind": "400"}], AgentStatus.FAILED, T.FAILED),
    ("unknown agent", "nobody", "hi", [], AgentStatus.FAILED, T.FAILED),
    ("empty replies", "calc", "stay silent", [], AgentStatus.FAILED, T.FAILED),
    ("budget spent", "steps", "loop forever", [], AgentStatus.BUDGET_EXHAUSTED, T.FAILED),
    ("cancelled", "calc", "think slowly", [], AgentStatus.CANCELLED, T.CANCELED),
]


@pytest.mark.parametrize(
    ("agent", "text", "faults", "status", "temporal"),
    [e[1:] for e in ENDINGS],
    ids=[e[0] for e in ENDINGS],
)
async def test_every_ending_agrees_everywhere(
    harness: Harness,
    agent: str,
    text: str,
    faults: list[dict[str, Any]],
    status: AgentStatus,
    temporal: WorkflowExecutionStatus,
) -> None:
    harness.model.set_faults(faults)
    async with harness.running():
        run = await harness.start(agent, text)
        if status == AgentStatus.CANCELLED:
            await harness.agents.cancel(run)
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
        described = await harness.client.get_workflow_handle(run).describe()
    assert result.status == status
    assert state.status == status
    assert described.typed_search_attributes.get(AGENT_STATUS) == status.value
    assert described.status == temporal
    if status != AgentStatus.COMPLETED:
        assert state.error and result.error  # and each says why
