"""Context that fits, by compaction: a long conversation's oldest messages are summarised
by a recorded model call; requests carry the summary and the latest messages, never a tool
result without its call; the transcript keeps everything, across continue-as-new."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType

from keel.activities.registry import Agent
from keel.testing import RuleSet
from keel.workflows.compaction import (
    SUMMARY_HEADING,
    SUMMARY_REQUEST,
    cut_point,
    request_messages,
)
from keel.workflows.models import (
    AgentStatus,
    ChatMessage,
    Compaction,
    Limits,
    ModelResult,
    ToolCall,
)
from tests.agents import add
from tests.conftest import Harness
from tests.rules import TEST_RULES
from tests.test_cli import keel

SUMMARY = "SUMMARY: the user asked to add one and two, again and again; each sum was 3."
COMPACTING = Agent(
    name="compacting",
    instructions="You add numbers.",
    tools=[add],
    limits=Limits(max_steps=28),
    compaction=Compaction(threshold_tokens=100, keep_last_messages=4),
)
RULES = [
    {
        "name": "summarise",
        "when": {"last_role": "user", "last_user": "^" + SUMMARY_REQUEST},
        "reply": {"content": SUMMARY},
    },
    {
        "name": "add again",
        "when": {"any_user": "(?i)^keep adding$"},
        "reply": {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},
    },
    {
        # once compacted, the request starts from the summary: the model goes on from it
        "name": "add again, from the summary",
        "when": {"system": "SUMMARY: the user asked to add"},
        "reply": {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},
    },
]


@pytest.fixture
def compacting(harness: Harness) -> Harness:
    rules = {**TEST_RULES, "rules": [*RULES, *TEST_RULES["rules"]]}
    harness.model.set_rules(RuleSet.from_dict(rules))
    return harness


async def model_calls(h: Harness, run: str) -> list[tuple[str, ModelResult]]:
    """Every `keel.call_model` activity of every history of the run: its summary and result."""
    out: list[tuple[str, ModelResult]] = []
    executions = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
    for w in sorted(executions, key=lambda w: w.start_time):
        history = await h.client.get_workflow_handle(run, run_id=w.run_id).fetch_history()
        summaries: dict[int, str] = {}
        for e in history.events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                a = e.activity_task_scheduled_event_attributes
                if a.activity_type.name == "keel.call_model":
                    (text,) = await h.client.data_converter.decode([e.user_metadata.summary], [str])
                    summaries[e.event_id] = text
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                a = e.activity_task_completed_event_attributes
                if a.scheduled_event_id in summaries:
                    (result,) = await h.client.data_converter.decode(
                        list(a.result.payloads), [ModelResult]
                    )
                    out.append((summaries[a.scheduled_event_id], result))
    return out


def calls_have_results(messages: list[dict[str, Any]]) -> bool:
    """Every tool result of a request follows the call it answers, in that request."""
    asked: set[str] = set()
    for m in messages:
        asked |= {c["id"] for c in m.get("tool_calls") or []}
        if m["role"] == "tool" and m["tool_call_id"] not in asked:
            return False
    return True


async def test_a_long_conversation_is_compacted(compacting: Harness) -> None:
    h = compacting
    async with h.running([COMPACTING]):
        run = await h.start("compacting", "keep adding")
        result = await h.agents.result(run, timeout=240)
        state = await h.agents.get_state(run)
        calls = await model_calls(h, run)
        code, out, err = await keel(h, "transcript", run)
    assert code == 0, err
    assert result.status == AgentStatus.BUDGET_EXHAUSTED  # 28 steps of adding
    executions = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
    assert len(executions) > 1  # it continued as new on the way

    # the full record: every step's call and result, and the summaries where they stood
    transcript = state.transcript
    assert transcript[1].content == "keep adding"
    assert sum(1 for m in transcript if m.role == "tool") == 28
    markers = [(i, m) for i, m in enumerate(transcript) if m.summarizes]
    assert markers and all(m.content == SUMMARY for _, m in markers)
    assert all(0 < m.summarizes <= i for i, m in markers)
    assert f"summary of messages 1-{markers[0][1].summarizes - 1}: {SUMMARY}" in out

    # one recorded summary call per marker, in the history, and its tokens are counted
    compactions = [r for s, r in calls if s.startswith("compact ")]
    steps = [r for s, r in calls if s.startswith("model ")]
    assert len(compactions) == len(markers) and len(steps) == 28
    assert all(r.message.content == SUMMARY for r in compactions)
    spent = sum(r.usage.total_tokens for r in compactions + steps)
    assert state.usage.total_tokens == spent

    # requests after a summary carry it and the latest messages; a tool result never goes
    # without its call; the summary outlives continue-as-new (the last request has it)
    sent = [r["body"]["messages"] for r in h.model.requests()]
    steps_sent = [m for m in sent if not m[-1]["content"].startswith(SUMMARY_REQUEST)]
    assert all(calls_have_results(m) for m in steps_sent)
    compacted = [m for m in steps_sent if SUMMARY_HEADING in m[0]["content"]]
    assert compacted and SUMMARY in compacted[0][0]["content"]
    assert SUMMARY_HEADING in steps_sent[-1][0]["content"]
    assert all(len(m) < 12 for m in compacted)  # the oldest messages are not resent
    assert len(steps_sent[-1]) < len(transcript) // 4


def test_a_cut_never_separates_a_call_from_its_result() -> None:
    call = ToolCall(id="c1", name="add", arguments="{}")
    transcript = [
        ChatMessage(role="system", content="you add"),
        ChatMessage(role="user", content="add"),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", tool_call_id="c1", name="add", content="3"),
        ChatMessage(role="assistant", content="3"),
        ChatMessage(role="system", content="they added", summarizes=3),
    ]
    # a summary covering up to the call would take the call from its result
    assert cut_point(transcript[:5], 1, 2) == 2  # before the call, not between
    assert cut_point(transcript[:5], 1, 1) == 4
    sent = request_messages(transcript[:5] + [transcript[5].model_copy(update={"summarizes": 4})])
    assert [m.role for m in sent] == ["system", "assistant"]
    assert "they added" in (sent[0].content or "")
