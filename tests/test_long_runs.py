"""Long runs continue-as-new when the server suggests it, carrying the whole state."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType

from keel.workflows.models import AgentStatus
from tests.conftest import Harness


async def test_continue_as_new_carries_everything(harness: Harness) -> None:
    # the session's dev server suggests continue-as-new after 120 events
    async with harness.running():
        run = await harness.start("long", "loop forever")
        result = await harness.agents.result(run, timeout=120)
        state = await harness.agents.get_state(run)
        first = harness.client.get_workflow_handle(run, run_id=None)
        desc = await first.describe()
    assert result.status == AgentStatus.BUDGET_EXHAUSTED
    assert state.step == 30
    assert len(state.transcript) == 2 + 2 * 30  # system, user, then assistant+tool per step
    assert state.usage.total_tokens >= 30  # usage summed across the whole chain
    # the chain: the first run ended in ContinuedAsNew, the latest holds the end
    runs = []
    handle = harness.client.get_workflow_handle(run, run_id=desc.run_id)
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    while started.continued_execution_run_id:
        runs.append(started.continued_execution_run_id)
        prev = harness.client.get_workflow_handle(run, run_id=started.continued_execution_run_id)
        prev_history = await prev.fetch_history()
        assert prev_history.events[-1].event_type == (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        )
        started = prev_history.events[0].workflow_execution_started_event_attributes
    assert len(runs) >= 1
    # the same run key across the chain: idempotency keys stay stable and unique
    assert state.run_key and len(state.run_key) == 36
    assert harness.model.stats()["served"] == 30  # no step asked twice across the chain


async def test_payload_limit_fails_fast_with_a_clear_error(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("long", "grow big")
        result = await harness.agents.result(run, timeout=120)
        state = await harness.agents.get_state(run)
    # each tool result was cut to a bounded size; the transcript still outgrew the limit
    tool_results = [m.content or "" for m in state.transcript if m.role == "tool"]
    assert all("more characters truncated" in c and len(c) < 100_100 for c in tool_results)
    assert result.status == AgentStatus.FAILED
    assert "over Keel's 1800000-byte limit" in (result.error or "")
    assert 15 <= state.step < 30
