"""Messages mid-run: queue, interrupt, rollback, reject; idle conversations; cancel; bursts.

Each test checks what the scripted model received next, which is what DESIGN.md specifies.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import pytest
from pydantic import BaseModel

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.client.api import KeelClientError
from keel.demo.agent import Ledger
from keel.testing.model_server import RuleSet
from keel.workflows.inbox import INTERRUPTED
from keel.workflows.models import AgentState, AgentStatus, MessagePolicy
from tests.agents import INSTRUCTIONS
from tests.conftest import Harness, wait_for
from tests.rules import TEST_RULES


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


async def held(h: Harness, gate: str) -> bool:
    """A model call waits at the scripted model's gate: it is surely in flight."""
    return h.model.held(gate) >= 1


class Gate:
    """The test's hold on one run's gated tools: each tool says when it started (and when it
    was cancelled), then waits until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.cancelled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)


GATES: defaultdict[str, Gate] = defaultdict(Gate)  # by run id (the worker runs in-process)


class NoArgs(BaseModel):
    pass


async def _behind_gate(ctx: ToolContext, name: str) -> None:
    gate = GATES[ctx.run_id]
    gate.started[name].set()
    try:
        await gate.opened.wait()
    except asyncio.CancelledError:
        gate.cancelled[name].set()
        raise


@tool(heartbeat_seconds=3, timeout_seconds=120)
async def gated_lookup(args: NoArgs, ctx: ToolContext) -> str:
    """A read that waits at the test's gate (interruptible)."""
    await _behind_gate(ctx, "gated_lookup")
    return json.dumps({"looked_up": True})


@tool(side_effects=True, heartbeat_seconds=3, timeout_seconds=120)
async def gated_email(args: NoArgs, ctx: ToolContext) -> str:
    """A side effect that waits at the test's gate: once started, it finishes."""
    await _behind_gate(ctx, "gated_email")
    ledger: Ledger = ctx.resources
    r = await asyncio.to_thread(
        ledger.email, "ops@example.com", "gated", "done", ctx.idempotency_key
    )
    return json.dumps(r)


GATED_TOOLS = [gated_lookup, gated_email]
GATED_AGENTS = [
    Agent(name="gated", instructions=INSTRUCTIONS, tools=GATED_TOOLS),
    Agent(
        name="strict-gated",
        instructions=INSTRUCTIONS,
        tools=GATED_TOOLS,
        message_policy=MessagePolicy.REJECT,
    ),
]
GATED_RULES = [
    {
        "name": "gated read",
        "when": {"last_role": "user", "last_user": "(?i)look it up"},
        "reply": {"tool_calls": [{"name": "gated_lookup", "arguments": {}}]},
    },
    {
        "name": "gated read and side effect",
        "when": {"last_role": "user", "last_user": "(?i)use gated tools"},
        "reply": {
            "tool_calls": [
                {"name": "gated_lookup", "arguments": {}},
                {"name": "gated_email", "arguments": {}},
            ]
        },
    },
]


@pytest.fixture
def gated(harness: Harness) -> Harness:
    """The harness whose model also asks for the gated tools."""
    rules = {**TEST_RULES, "rules": [*GATED_RULES, *TEST_RULES["rules"]]}
    harness.model.set_rules(RuleSet.from_dict(rules))
    return harness


async def start_gated(h: Harness, agent: str, text: str, *tools: str) -> tuple[str, Gate]:
    """Start a run whose tool calls wait at a gate; return once these tools are running."""
    run = await h.start(agent, text)
    gate = GATES[run]
    for name in tools:
        await gate.started[name].wait()
    return run, gate


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


async def test_queue_during_tool_call(gated: Harness) -> None:
    async with gated.running(GATED_AGENTS):
        run, gate = await start_gated(gated, "gated", "look it up", "gated_lookup")
        receipt = await gated.agents.send_message(run, "and then this", "queue")
        assert receipt.status == "queued"
        gate.opened.set()
        result = await gated.agents.result(run, timeout=30)
    assert result.final_answer == "You said: and then this"
    second = shape(sent(gated)[1])
    assert second[2:] == [
        "assistant->gated_lookup",
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


async def interrupt_both_gated_tools(h: Harness, text: str, policy: str) -> str:
    """A run whose read and side effect both wait at the gate; the message (or a cancel, with
    no policy) cancels the read; only then does the side effect go on."""
    run, gate = await start_gated(h, "gated", text, "gated_lookup", "gated_email")
    if policy:
        await h.agents.send_message(run, "say hello", policy)
    else:
        await h.agents.cancel(run)
    await gate.cancelled["gated_lookup"].wait()
    assert not gate.cancelled["gated_email"].is_set()  # a side effect is never cut short
    assert h.ledger.rows("outbox") == []  # and it had not happened before the stop
    gate.opened.set()
    return run


async def test_interrupt_during_tools(gated: Harness) -> None:
    async with gated.running(GATED_AGENTS):
        run = await interrupt_both_gated_tools(gated, "use gated tools", "interrupt")
        result = await gated.agents.result(run, timeout=30)
        state = await gated.agents.get_state(run)
    assert result.final_answer == "Hello!"
    second = sent(gated)[1]
    # the interruptible read was cancelled, the side effect finished; no dangling call
    assert shape(second)[2:] == [
        "assistant->gated_lookup,gated_email",
        f"tool:{INTERRUPTED}",
        'tool:{"email_id": "E-0001", "to": "ops@example.com", "status": "queued"}',
        "user:say hello",
    ]
    assert [e.tool for e in state.effects] == ["gated_email"]
    assert len(gated.ledger.rows("outbox")) == 1


async def test_rollback_during_tools(gated: Harness) -> None:
    async with gated.running(GATED_AGENTS):
        run = await interrupt_both_gated_tools(gated, "use gated tools", "rollback")
        result = await gated.agents.result(run, timeout=30)
        state = await gated.agents.get_state(run)
    assert result.final_answer == "Hello!"
    # the rolled-back turn is absent, as if "say hello" had been sent instead
    assert shape(sent(gated)[1]) == ["system:You are a test agent.", "user:say hello"]
    # the committed effect stays in the run's record
    assert [e.tool for e in state.effects] == ["gated_email"]
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
    [("take a moment", "Moment taken."), ("look it up", 'Done: {"looked_up": true}')],
    ids=["during-model-call", "during-tool-call"],
)
async def test_reject_policy_refuses_while_in_flight(
    gated: Harness, text: str, answer: str
) -> None:
    async with gated.running(GATED_AGENTS):
        if text == "look it up":
            run, gate = await start_gated(gated, "strict-gated", text, "gated_lookup")
        else:
            run, gate = await gated.start("strict-gated", text), Gate()  # no tool to hold
            await wait_for(lambda: held(gated, "moment"))
        receipt = await gated.agents.send_message(run, "hurry up")
        assert receipt.status == "rejected" and "in flight" in receipt.reason
        await gated.client.get_workflow_handle(run).signal(
            "keel.submit_message", {"text": "hurry!"}
        )
        gated.model.release("moment")
        gate.opened.set()
        result = await gated.agents.result(run, timeout=30)
        state = await gated.agents.get_state(run)
    assert result.final_answer == answer
    assert all("hurry" not in str(conversation) for conversation in sent(gated))
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


async def test_cancel_lets_side_effects_finish_and_records_them(gated: Harness) -> None:
    async with gated.running(GATED_AGENTS):
        run = await interrupt_both_gated_tools(gated, "use gated tools", "")
        result = await gated.agents.result(run, timeout=30)
        state = await gated.agents.get_state(run)
    assert result.status == AgentStatus.CANCELLED
    assert state.status == AgentStatus.CANCELLED
    assert len(gated.ledger.rows("outbox")) == 1
    assert [e.tool for e in state.effects] == ["gated_email"]
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


async def test_cancel_during_an_interrupt_still_lets_side_effects_finish(gated: Harness) -> None:
    async with gated.running(GATED_AGENTS):
        run, gate = await start_gated(
            gated, "gated", "use gated tools", "gated_lookup", "gated_email"
        )
        await gated.agents.send_message(run, "say hello", "interrupt")
        await gated.agents.cancel(run)
        await gate.cancelled["gated_lookup"].wait()
        assert not gate.cancelled["gated_email"].is_set()
        gate.opened.set()
        result = await gated.agents.result(run, timeout=30)
        state = await gated.agents.get_state(run)
    assert result.status == AgentStatus.CANCELLED
    assert [e.tool for e in state.effects] == ["gated_email"]
    assert len(gated.ledger.rows("outbox")) == 1
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
