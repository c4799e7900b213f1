"""The durable loop end to end: real dev server, scripted model over HTTP."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType

from tests.conftest import Harness
from workflows.models import AgentStatus


async def activity_summaries(h: Harness, run_id: str) -> list[str]:
    history = await h.client.get_workflow_handle(run_id).fetch_history()
    out = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            out.append(
                h.client.data_converter.payload_converter.from_payload(e.user_metadata.summary)
            )
    return out


async def test_run_completes_with_tool_call(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "Please add 2 and 3")
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "The sum is 5."
    roles = [m.role for m in state.transcript]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert state.step == 2 and state.usage.total_tokens > 0
    summaries = await activity_summaries(harness, run)
    assert summaries == ["model scripted · step 1", "tool add(a=2, b=3)", "model scripted · step 2"]
    assert harness.model.stats()["served"] == 2
