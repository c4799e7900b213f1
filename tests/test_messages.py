"""Messages mid-run: queue, interrupt, rollback, reject; idle conversations; cancel; bursts.

Each test checks what the scripted model received next, which is what DESIGN.md specifies.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keel.client.api import KeelClientError
from keel.workflows.inbox import INTERRUPTED
from keel.workflows.models import AgentState, AgentStatus
from tests.conftest import Harness, wait_for


def sent(h: Harness) -> list[list[dict[str, Any]]]:
    """The conversations the model was asked about, in order."""
    return [r["body"]["messages"] for r in h.model.requests()]


def shape(messages: list[dict[str, Any]]) -> list[str]:
    """A conversation as `role:content` (tool calls as `assistant->name,name`)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            out.append("assistant->" + ",".join(c["function"]["name"] for c in m["tool_calls"]))
        else:
            out.append(f"{m['role']}:{m['content']}")
    return out


async def in_model_call(h: Harness, n: int) -> bool:
    return h.model.stats()["requests"] >= n


async def held(h: Harness, gate: str) -> bool:
    """A model call waits at the scripted model's gate: it is surely in flight."""
    return h.model.held(gate) >= 1


async def tools_running(h: Harness, run: str) -> AgentState | None:
    s = await h.agents.get_state(run)
    return s if s.transcript and s.transcript[-1].tool_calls else None


async def test_queue_during_model_call(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "take a moment")
        await wait_for(lambda: held(harness, "moment"))
        receipt = await harness.agents.send_message(run, "follow up", "queue")
        assert receipt.status == "queued"
        harness.model.release("moment")
        result = await harness.agents.result(run, timeout=30)
    assert result.final_answer == "You said: follow up"
    assert shape(sent(harness)[1]) == [
        "system:You are a test agent.",
        "user:take a moment",
        "assistant:Moment taken.",
        "user:follow up",
    ]


async def test_queue_during_tool_call(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "wait a bit")
        await wait_for(lambda: tools_running(harness, run))
        await harness.agents.send_message(run, "and then this", "queue")
        result = await harness.agents.result(run, timeout=30)
    assert result.final_answer == "You said: and then this"
    second = shape(sent(harness)[1])
    assert second[2:] == [
        "assistant->slow_lookup",
        'tool:{"looked_up": true}',
        "user:and then this",
    ]


async def test_interrupt_during_model_call(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "think slowly")
        await wait_for(lambda: held(harness, "slow"))
        receipt = await harness.agents.send_message(run, "say hello", "interrupt")
        assert receipt.status == "queued"
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.final_answer == "Hello!"
    assert shape(sent(harness)[1]) == [
        "system:You are a test agent.",
        "user:think slowly",
        "user:say hello",
    ]
    assert "interrupted" in [a.kind for a in state.audit]


async def test_interrupt_during_tools(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "use slow tools")
        await wait_for(lambda: tools_running(harness, run))
        await harness.agents.send_message(run, "say hello", "interrupt")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.final_answer == "Hello!"
    second = sent(harness)[1]
    # the interruptible read was cancelled, the side effect finished; no dangling call
    assert shape(second)[2:] == [
        "assistant->slow_lookup,slow_email",
        f"tool:{INTERRUPTED}",
        'tool:{"email_id": "E-0001", "to": "ops@example.com", "status": "queued"}',
        "user:say hello",
    ]
    assert [e.tool for e in state.effects] == ["slow_email"]
    assert len(harness.ledger.rows("outbox")) == 1


async def test_rollback_during_tools(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "use slow tools")
        await wait_for(lambda: tools_running(harness, run))
        await harness.agents.send_message(run, "say hello", "rollback")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.final_answer == "Hello!"
    # the rolled-back turn is absent, as if "say hello" had been sent instead
    assert shape(sent(harness)[1]) == ["system:You are a test agent.", "user:say hello"]
    # the committed effect stays in the run's record
    assert [e.tool for e in state.effects] == ["slow_email"]
    assert "rolled_back" in [a.kind for a in state.audit]


async def test_rollback_during_model_call(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "think slowly")
        await wait_for(lambda: held(harness, "slow"))
        await harness.agents.send_message(run, "say hello", "rollback")
        result = await harness.agents.result(run, timeout=30)
    assert result.final_answer == "Hello!"
    assert shape(sent(harness)[1]) == ["system:You are a test agent.", "user:say hello"]


async def test_interrupt_withdraws_open_approvals(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop-open", "charge 30")
        state = await wait_for(lambda: _pending(harness, run))
        call_id = state.pending_approvals[0].call_id
        await harness.agents.send_message(run, "say hello", "interrupt")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
        with pytest.raises(KeelClientError, match="withdrawn"):
            await harness.agents.approve(run, call_id, "alice")
        await harness.agents.cancel(run)
    assert result.final_answer == "Hello!"
    assert state.pending_approvals == [] and harness.ledger.rows("refunds") == []
    assert shape(sent(harness)[1])[2:] == [
        "assistant->charge",
        f"tool:{INTERRUPTED}",
        "user:say hello",
    ]
    assert "withdrawn" in [a.kind for a in state.audit]


async def _pending(h: Harness, run: str) -> AgentState | None:
    s = await h.agents.get_state(run)
    return s if s.pending_approvals else None


@pytest.mark.parametrize(
    ("text", "answer"),
    [("take a moment", "Moment taken."), ("wait a bit", 'Done: {"looked_up": true}')],
    ids=["during-model-call", "during-tool-call"],
)
async def test_reject_policy_refuses_while_in_flight(
    harness: Harness, text: str, answer: str
) -> None:
    async with harness.running():
        run = await harness.start("strict-chat", text)
        await wait_for(lambda: in_model_call(harness, 1))
        if text == "wait a bit":
            await wait_for(lambda: tools_running(harness, run))
        receipt = await harness.agents.send_message(run, "hurry up")
        assert receipt.status == "rejected" and "in flight" in receipt.reason
        await harness.client.get_workflow_handle(run).signal(
            "keel.submit_message", {"text": "hurry!"}
        )
        harness.model.release("moment")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.final_answer == answer
    assert all("hurry" not in str(conversation) for conversation in sent(harness))
    assert [a.detail for a in state.audit if a.kind == "message_rejected"] == [
        "a turn is in flight and this message's policy is reject"
    ]


async def test_burst_of_messages_none_lost_order_kept(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "take a moment")
        await wait_for(lambda: held(harness, "moment"))
        handle = harness.client.get_workflow_handle(run)
        for i in range(30):
            if i % 2:
                await handle.signal("keel.submit_message", {"text": f"msg {i}"})
            else:
                await harness.agents.send_message(run, f"msg {i}")
        harness.model.release("moment")  # all 30 came while the model call was in flight
        result = await harness.agents.result(run, timeout=30)
    assert result.final_answer == "You said: msg 29"
    users = [m["content"] for m in sent(harness)[1] if m["role"] == "user"]
    assert users == ["take a moment"] + [f"msg {i}" for i in range(30)]


async def test_idle_conversation_takes_next_turn(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("chat", "say hello")
        first = await harness.agents.result(run, timeout=30)
        assert (first.status, first.final_answer) == (AgentStatus.IDLE, "Hello!")
        receipt = await harness.agents.send_message(run, "echo this", "reject")
        assert receipt.status == "delivered"  # nothing in flight: even `reject` is taken
        state = await wait_for(lambda: _idle_with(harness, run, "You said: echo this"))
        assert state.turn == 2
        await harness.agents.cancel(run)
        state = await wait_for(lambda: _status(harness, run, AgentStatus.CANCELLED))
    assert [m.role for m in state.transcript] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


async def _idle_with(h: Harness, run: str, answer: str) -> AgentState | None:
    s = await h.agents.get_state(run)
    return s if s.status == AgentStatus.IDLE and s.final_answer == answer else None


async def _status(h: Harness, run: str, status: AgentStatus) -> AgentState | None:
    s = await h.agents.get_state(run)
    return s if s.status == status else None


async def test_cancel_lets_side_effects_finish_and_records_them(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "use slow tools")
        await wait_for(lambda: tools_running(harness, run))
        await harness.agents.cancel(run)  # slow_email (a side effect) is still running
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.CANCELLED
    assert state.status == AgentStatus.CANCELLED
    assert len(harness.ledger.rows("outbox")) == 1
    assert [e.tool for e in state.effects] == ["slow_email"]
    results = [m.content for m in state.transcript if m.role == "tool"]
    assert results[0] == INTERRUPTED and "E-0001" in (results[1] or "")


async def test_cancel_before_the_run_started(harness: Harness) -> None:
    run = await harness.start("calc", "say hello")  # no worker yet
    await harness.agents.cancel(run)
    async with harness.running():
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == state.status == AgentStatus.CANCELLED


async def test_rollback_before_the_spec_is_loaded_keeps_instructions(harness: Harness) -> None:
    from keel.workflows.agent import AgentWorkflow
    from keel.workflows.models import AgentInput

    run = f"test-{harness.settings.task_queue}"
    await harness.client.start_workflow(
        AgentWorkflow.run,
        AgentInput(agent="calc", message="take a moment", user="t"),
        id=run,
        task_queue=harness.settings.task_queue,
        start_signal="keel.submit_message",
        start_signal_args=[{"text": "say hello", "policy": "rollback"}],
    )
    async with harness.running():
        await harness.agents.result(run, timeout=30)
    first = shape(sent(harness)[0])
    assert first[0] == "system:You are a test agent."
    assert "user:say hello" in first


async def test_cancel_during_an_interrupt_still_lets_side_effects_finish(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "use slow tools")
        await wait_for(lambda: tools_running(harness, run))
        await harness.agents.send_message(run, "say hello", "interrupt")
        await harness.agents.cancel(run)
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.CANCELLED
    assert [e.tool for e in state.effects] == ["slow_email"]
    assert len(harness.ledger.rows("outbox")) == 1
    assert [m.role for m in state.transcript[-2:]] == ["tool", "tool"]  # no dangling call


async def test_many_senders_at_once_each_message_delivered_exactly_once(
    harness: Harness,
) -> None:
    """More updates in flight than Temporal takes per run (10), on a run that continues as
    new meanwhile: every sender gets a true receipt, every message arrives once."""
    async with harness.running():
        run = await harness.start("chat-long", "say hello")
        await harness.agents.result(run, timeout=30)
        first_run = (await harness.client.get_workflow_handle(run).describe()).run_id
        texts = [f"note {i}" for i in range(60)]
        receipts = await asyncio.gather(*(harness.agents.send_message(run, t) for t in texts))
        state = await wait_for(lambda: _all_delivered(harness, run, texts), timeout=60)
        # a resend with the same id (an answer lost on the way) is not delivered again,
        # by the update or by the signal
        first = await harness.agents.send_message(run, "resent", message_id="fixed")
        again = await harness.agents.send_message(run, "resent", message_id="fixed")
        handle = harness.client.get_workflow_handle(run)
        await handle.signal("keel.submit_message", {"text": "resent", "id": "fixed"})
        await handle.signal("keel.submit_message", {"text": "sentinel"})
        state = await wait_for(lambda: _all_delivered(harness, run, [*texts, "sentinel"]))
        last_run = (await handle.describe()).run_id
        await harness.agents.cancel(run)
    # each sender is told the truth: taken (queued or delivered), or taken before (a send the
    # client retried across continue-as-new)
    assert {r.status for r in receipts} <= {"queued", "delivered", "duplicate"}
    users = [m.content for m in state.transcript if m.role == "user"]
    assert sorted(u for u in users if u in texts) == sorted(texts)  # each once, none lost
    assert first.status == "delivered" and again.status in ("delivered", "duplicate")
    assert users.count("resent") == 1
    assert last_run != first_run  # the run continued as new while the messages came in


async def _all_delivered(h: Harness, run: str, texts: list[str]) -> object:
    s = await h.agents.get_state(run)
    users = {m.content for m in s.transcript if m.role == "user"}
    return s if s.status == AgentStatus.IDLE and set(texts) <= users else None


async def test_messages_that_cannot_fit_are_refused_at_the_door(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("chat-long", "say hello")
        await harness.agents.result(run, timeout=30)
        big = "x" * 99_999  # under the per-message limit
        receipts = [await harness.agents.send_message(run, big, "queue") for _ in range(14)]
        state = await harness.agents.get_state(run)
        await harness.agents.cancel(run)
    refused = [r for r in receipts if r.status == "rejected"]
    assert refused and "more than one model request can carry" in refused[0].reason
    assert state.status != AgentStatus.FAILED  # what was taken still fits a request
