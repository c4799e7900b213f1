"""Long runs continue-as-new when the server suggests it, carrying the whole state."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

from keel.workflows.models import RUN_TOOL, AgentStatus, ModelResult, RunState, ToolInput
from tests.conftest import Harness, wait_for


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
    histories = [history]
    started = history.events[0].workflow_execution_started_event_attributes
    while started.continued_execution_run_id:
        runs.append(started.continued_execution_run_id)
        prev = harness.client.get_workflow_handle(run, run_id=started.continued_execution_run_id)
        prev_history = await prev.fetch_history()
        histories.append(prev_history)
        assert prev_history.events[-1].event_type == (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        )
        started = prev_history.events[0].workflow_execution_started_event_attributes
    assert len(runs) >= 1
    assert harness.model.stats()["served"] == 30  # no step asked twice across the chain
    # every tool call of every history in the chain: one run key, steps that go on
    convert = harness.client.data_converter.payload_converter
    keys, tokens = [], 0
    for h in reversed(histories):
        for e in h.events:
            if e.HasField("activity_task_scheduled_event_attributes"):
                a = e.activity_task_scheduled_event_attributes
                if a.activity_type.name == RUN_TOOL:
                    keys.append(
                        convert.from_payload(a.input.payloads[0], ToolInput).idempotency_key
                    )
            if e.HasField("activity_task_completed_event_attributes"):
                result = e.activity_task_completed_event_attributes.result.payloads[0]
                value = convert.from_payload(result)
                if isinstance(value, dict) and "usage" in value:  # a model step's result
                    tokens += ModelResult.model_validate(value).usage.total_tokens
    assert len(keys) == 30 and len(set(keys)) == 30
    assert {k.rsplit("-", 2)[0] for k in keys} == {state.run_key}  # one key for the chain
    assert [int(k.rsplit("-", 2)[1]) for k in keys] == list(range(1, 31))
    assert state.usage.total_tokens == tokens  # usage carried whole, not restarted


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


async def test_queries_answer_small_whatever_the_runs_size(harness: Harness) -> None:
    """A 1.4 MB answer, read by several clients at once: each query's answer stays small
    (the client pages the rest), and the run is unharmed."""
    async with harness.running():
        run = await harness.start("calc", "say a lot")
        result = await harness.agents.result(run, timeout=60)
        handle = harness.client.get_workflow_handle(run)
        raw = await asyncio.gather(
            *(handle.query("keel.get_state", result_type=RunState) for _ in range(6))
        )
        full = await asyncio.gather(*(harness.agents.get_state(run) for _ in range(6)))
        status = await harness.agents.status(run)  # what lists and waits read
        described = await handle.describe()
    assert result.status == AgentStatus.COMPLETED
    assert (status.status, status.step, status.keeps_open) == (AgentStatus.COMPLETED, 1, False)
    assert len(status.model_dump_json()) < 1_000
    assert len(result.final_answer or "") == 1_400_000
    for view in raw:
        assert len(view.model_dump_json()) < 400_000 and view.cut
    for state in full:
        assert state.final_answer == "y" * 1_400_000
        assert state.transcript[-1].content == "y" * 1_400_000 and not state.cut
    assert described.status == WorkflowExecutionStatus.COMPLETED


async def test_a_run_parked_on_an_approval_continues_as_new(harness: Harness) -> None:
    # refused signals are history events: a run waiting for a person must still move to a
    # fresh history (the session's server suggests it after 120 events), keeping its open
    # approval and deadline, and the call that already ran is not run again
    async with harness.running():
        run = await harness.start("shop", "charge twice")

        async def parked() -> RunState | None:
            s = await harness.agents.get_state(run)
            return s if s.pending_approvals and harness.ledger.rows("refunds") else None

        before = await wait_for(parked)
        request = before.pending_approvals[0]
        handle = harness.client.get_workflow_handle(run)
        first = (await handle.describe()).run_id
        for i in range(400):  # bounded: the server suggests a new history long before
            await handle.signal("keel.decide", f"garbage {i}")
            if i % 10 == 9 and (await handle.describe()).run_id != first:
                break
        latest = await handle.describe()
        assert latest.run_id != first, "the parked run never continued-as-new"
        after = await harness.agents.get_state(run)
        assert after.status == AgentStatus.WAITING_APPROVAL
        assert [(r.call_id, r.expires_at) for r in after.pending_approvals] == [
            (request.call_id, request.expires_at)
        ]
        assert after.audit_dropped + sum(e.kind == "signal_refused" for e in after.audit) >= 10
        receipt = await harness.agents.approve(run, request.call_id, "alice")
        assert receipt.accepted
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    # the 5 ran once, before the new history; the 30 once, after the approval
    assert sorted(r["amount"] for r in harness.ledger.rows("refunds")) == [5, 30]
    assert sorted(e.arguments["amount"] for e in state.effects) == [5, 30]
    calls = [c.id for c in state.transcript[2].tool_calls]
    assert [m.tool_call_id for m in state.transcript if m.role == "tool"] == calls
    assert state.step == 2 and state.transcript[-1].role == "assistant"
    # the new history ran only the approved call: one tool activity
    history = await harness.client.get_workflow_handle(run, run_id=latest.run_id).fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled.count(RUN_TOOL) == 1
