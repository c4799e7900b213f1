"""Pure decisions, without a server."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from keel.workflows.inbox import Inbox, message_refusal
from keel.workflows.models import (
    MAX_REFUSALS,
    AgentSpec,
    AgentState,
    AgentStatus,
    ApprovalMode,
    ApprovalPolicy,
    ApprovalRequest,
    AuditEntry,
    ChatMessage,
    Condition,
    DecideInput,
    Decision,
    DecisionRecord,
    Limits,
    MessageInput,
    MessagePolicy,
    ToolSpec,
    Usage,
)
from keel.workflows.policy import (
    approval_reason,
    budget_exhausted,
    idempotency_key,
    parse_arguments,
    short_args,
)
from tests.policies import refuse_decision

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REFUND = ToolSpec(
    name="refund",
    parameters={
        "type": "object",
        "properties": {"amount": {"type": "number"}},
        "required": ["amount"],
    },
    approval=ApprovalPolicy(
        mode=ApprovalMode.WHEN,
        when=[Condition(field="amount", op=">", value=100)],
        approvers=["ann"],
    ),
)
SPEC = AgentSpec(
    name="a", tools=[REFUND], limits=Limits(max_steps=3, max_tokens=100, max_seconds=60)
)


def test_approval_reason_by_condition() -> None:
    assert approval_reason(REFUND, {"amount": 50}) is None
    assert approval_reason(REFUND, {"amount": 150}) == "refund: amount > 100"
    # cannot be judged (type mismatch, field absent): fails closed, a person decides
    assert approval_reason(REFUND, {"amount": "lots"}) == "refund: amount > 100"
    assert approval_reason(REFUND, {}) == "refund: amount > 100"
    always = REFUND.model_copy(update={"approval": ApprovalPolicy(mode=ApprovalMode.ALWAYS)})
    assert approval_reason(always, {}) == "refund always needs approval"


def test_parse_arguments() -> None:
    assert parse_arguments('{"a": 1}') == ({"a": 1}, "")
    assert parse_arguments("")[0] == {}
    assert "not valid JSON" in parse_arguments('{"a":')[1]
    assert "JSON object" in parse_arguments("[1]")[1]


def _state_with_request(**kw: object) -> AgentState:
    req = ApprovalRequest(
        call_id="c1",
        tool="refund",
        arguments={"amount": 150},
        approvers=["ann"],
        requested_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    return AgentState(pending_approvals=[req], **kw)  # type: ignore[arg-type]


def test_decision_refusals() -> None:
    st = _state_with_request()
    ok = DecideInput(call_id="c1", decision=Decision.APPROVE, approver="ann")
    assert refuse_decision(SPEC, st, ok, NOW) == ""
    assert "no pending approval" in refuse_decision(
        SPEC, st, ok.model_copy(update={"call_id": "x"}), NOW
    )
    assert "may not decide" in refuse_decision(
        SPEC, st, ok.model_copy(update={"approver": "bo"}), NOW
    )
    assert "expired" in refuse_decision(SPEC, st, ok, NOW + timedelta(hours=2))
    edit = ok.model_copy(update={"decision": Decision.EDIT, "arguments": {"amount": "x"}})
    assert "edited arguments are invalid: amount" in refuse_decision(SPEC, st, edit, NOW)
    edit_ok = ok.model_copy(update={"decision": Decision.EDIT, "arguments": {"amount": 90}})
    assert refuse_decision(SPEC, st, edit_ok, NOW) == ""
    # an edit names only what changes; the merged arguments are what is validated
    assert refuse_decision(SPEC, st, edit_ok.model_copy(update={"arguments": {}}), NOW) != ""
    done = AgentState(decisions=[DecisionRecord(call_id="c1", outcome="rejected", by="al", at=NOW)])
    assert "already decided (rejected by al)" in refuse_decision(SPEC, done, ok, NOW)
    expired = AgentState(decisions=[DecisionRecord(call_id="c1", outcome="expired", at=NOW)])
    assert "expired" in refuse_decision(SPEC, expired, ok, NOW)
    # the record of decisions is not the audit trail: a flood of refusals cannot erase it
    for _ in range(MAX_REFUSALS + 5):
        expired.record(AuditEntry(at=NOW, kind="decision_refused", call_id="c1"))
    assert "expired" in refuse_decision(SPEC, expired, ok, NOW)


def test_budgets() -> None:
    st = AgentState(step=3, started_at=NOW)
    assert "step budget" in budget_exhausted(SPEC, st, NOW)
    st = AgentState(step=1, usage=Usage(total_tokens=100), started_at=NOW)
    assert "token budget" in budget_exhausted(SPEC, st, NOW)
    st = AgentState(step=1, started_at=NOW)
    assert budget_exhausted(SPEC, st, NOW + timedelta(seconds=59)) == ""
    assert "time budget" in budget_exhausted(SPEC, st, NOW + timedelta(seconds=61))
    st.paused_seconds = 3600  # an hour waiting for an approval is not work
    assert budget_exhausted(SPEC, st, NOW + timedelta(seconds=3659)) == ""


def test_message_policies() -> None:
    st = AgentState(status=AgentStatus.RUNNING, transcript=[ChatMessage(role="system")])
    inbox = Inbox(st)
    strict = SPEC.model_copy(update={"message_policy": MessagePolicy.REJECT})
    assert "in flight" in message_refusal(strict, st, MessageInput(text="hi"))
    assert message_refusal(strict, st, MessageInput(text="hi", policy=MessagePolicy.QUEUE)) == ""
    assert "empty" in message_refusal(SPEC, st, MessageInput(text="  "))
    assert inbox.accept(SPEC, MessageInput(text="a"), NOW).status == "queued"
    assert inbox.stop_turn is None
    inbox.accept(SPEC, MessageInput(text="b", policy=MessagePolicy.ROLLBACK), NOW)
    inbox.accept(SPEC, MessageInput(text="c", policy=MessagePolicy.INTERRUPT), NOW)
    assert inbox.stop_turn == MessagePolicy.ROLLBACK  # the stronger request stays
    assert [q.text for q in st.queued_messages] == ["a", "b", "c"]
    st.status = AgentStatus.COMPLETED
    assert "ended" in message_refusal(SPEC, st, MessageInput(text="late"))


def test_rollback_drops_the_turn() -> None:
    st = AgentState(
        transcript=[
            ChatMessage(role="system", content="s"),
            ChatMessage(role="user", content="first"),
            ChatMessage(role="assistant", content="answer 1"),
            ChatMessage(role="user", content="second"),
            ChatMessage(role="assistant", content="working"),
        ],
        turn=2,
        turn_start=3,
    )
    inbox = Inbox(st)
    inbox.accept(SPEC, MessageInput(text="instead", policy=MessagePolicy.ROLLBACK), NOW)
    inbox.apply_stop(NOW)
    inbox.deliver()
    assert [m.content for m in st.transcript] == ["s", "first", "answer 1", "instead"]
    assert st.turn == 3 and st.turn_start == 3


def test_small_helpers() -> None:
    assert short_args('{"order_id": "A-1", "amount": 20.5}') == 'order_id="A-1", amount=20.5'
    assert short_args('{"x": "' + "y" * 100 + '"}').endswith("…")
    key = idempotency_key("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", 3, 1)
    assert key == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-3-1"
    assert re.fullmatch(r"[0-9a-f-]+", key)  # safe as a file name and in a URL
    assert idempotency_key("k", 3, 1, safe=False) == "k:3:1"  # runs recorded before


def test_bad_input_cannot_grow_the_audit_without_bound() -> None:
    import pytest
    from pydantic import ValidationError

    st = AgentState()
    st.record(AuditEntry(at=NOW, kind="approved", actor="ann", call_id="c1"))
    st.record(AuditEntry(at=NOW, kind="rejected", actor="bob", call_id="c2", detail="no"))
    for i in range(1500):
        st.record(AuditEntry(at=NOW, kind="signal_refused", detail="x" * 10_000))
        if i % 100 == 0:  # people's messages and decisions keep coming between the refusals
            st.record(AuditEntry(at=NOW, kind="message", actor="dana", detail=f"m{i}"))
    assert st.audit_dropped == 1500 - MAX_REFUSALS
    assert sum(e.kind == "signal_refused" for e in st.audit) == MAX_REFUSALS
    # a person's rejection is a decision, not a refusal: it stays, as does every message
    assert [e.kind for e in st.audit[:2]] == ["approved", "rejected"]
    assert sum(e.kind == "message" for e in st.audit) == 15
    assert max(len(e.detail) for e in st.audit) == 500
    with pytest.raises(ValidationError):
        DecideInput(call_id="c" * 10_000, decision=Decision.APPROVE, approver="ann")


def test_a_loops_own_message_after_an_answer_starts_the_turn_a_rollback_drops() -> None:
    from keel.workflows.inbox import Inbox
    from keel.workflows.models import AgentState, ChatMessage, MessagePolicy

    st = AgentState()
    inbox = Inbox(st)
    st.transcript = [ChatMessage(role="system", content="rules")]
    inbox.add("my laptop is broken")
    inbox.add("make a plan")  # the same turn: no answer came between
    st.transcript.append(ChatMessage(role="assistant", content="- step one"))
    inbox.add("step 1 of the plan: step one")  # after an answer: a new turn
    st.transcript.append(ChatMessage(role="assistant", content="working on it"))
    assert (st.turn, st.turn_start) == (2, 4)
    inbox.stop_turn = MessagePolicy.ROLLBACK
    inbox.apply_stop(datetime(2026, 1, 1, tzinfo=UTC))
    assert [m.content for m in st.transcript] == [
        "rules",
        "my laptop is broken",
        "make a plan",
        "- step one",
    ]


def test_a_long_conversation_sends_its_latest_turns_that_fit() -> None:
    from keel.workflows.models import ChatMessage, ToolCall
    from keel.workflows.views import context_window

    def user(t: str) -> ChatMessage:
        return ChatMessage(role="user", content=t)

    calls = [ToolCall(id="c1", name="add", arguments="{}")]
    t = [
        ChatMessage(role="system", content="rules"),
        user("a" * 50),
        ChatMessage(role="assistant", content="b" * 50),
        user("c" * 50),
        ChatMessage(role="assistant", tool_calls=calls),
        ChatMessage(role="tool", tool_call_id="c1", content="d" * 30),
        ChatMessage(role="assistant", content="e" * 10),
    ]
    assert context_window(t, 10_000) == t  # it fits: all of it
    window = context_window(t, 130)
    assert [m.content for m in window[1:]] == ["c" * 50, None, "d" * 30, "e" * 10]
    assert "2 earlier messages" in (window[0].content or "") and t[0].content == "rules"
    # even when the latest turn alone is too long, it is sent from its user message
    assert context_window(t, 20)[1].content == "c" * 50
