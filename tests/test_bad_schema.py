"""A tool whose own JSON schema is invalid (a hand-built ToolSpec) must not break a run: the
check runs in workflow code and in a signal handler, where an exception would fail the
workflow task again and again. The model and the approver are told instead."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from keel.activities.registry import Agent
from keel.testing.model_server import RuleSet, ScriptedModelServer
from keel.workflows.decisions import DecisionTarget, judge
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    AgentStatus,
    ApprovalRequest,
    DecideInput,
    Decision,
    ToolSpec,
)
from keel.workflows.policy import validate_arguments
from tests.agents import add
from tests.conftest import Harness

BROKEN = {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_an_invalid_schema_is_reported_not_raised() -> None:
    problem = validate_arguments(ToolSpec(name="t", parameters=BROKEN), {"a": 1})
    assert "schema is invalid" in problem and "zero" in problem


def test_an_edit_of_a_call_whose_tool_schema_is_invalid_is_refused_with_the_reason() -> None:
    spec = AgentSpec(name="a", tools=[ToolSpec(name="t", parameters=BROKEN)])
    request = ApprovalRequest(
        call_id="c1",
        tool="t",
        arguments={"a": 1},
        requested_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    state = AgentState(pending_approvals=[request])
    edit = DecideInput(call_id="c1", decision=Decision.EDIT, approver="ann", arguments={"a": 2})
    verdict = judge(spec, state, edit, NOW, DecisionTarget("default", "run", "first"))
    assert "schema is invalid" in verdict.refusal
    assert verdict.decision is None  # nothing applies


async def test_a_run_calling_a_tool_with_an_invalid_schema_completes(harness: Harness) -> None:
    broken = dataclasses.replace(
        add, spec=add.spec.model_copy(update={"name": "broken", "parameters": BROKEN})
    )
    agent = Agent(name="broken-schema", instructions="Use the tool.", tools=[broken])
    rules = {
        "rules": [
            {
                "name": "report",
                "when": {"last_role": "tool", "last_tool_result": "^(?P<result>.*)$"},
                "reply": {"content": "Reported: {result}"},
            },
            {
                "name": "call",
                "when": {"last_role": "user"},
                "reply": {"tool_calls": [{"name": "broken", "arguments": {"a": 1}}]},
            },
        ]
    }
    with ScriptedModelServer(RuleSet.from_dict(rules)) as model:
        h = Harness(harness.env, model, harness.ledger)
        async with h.running([agent]):
            run = await h.start("broken-schema", "go")
            result = await h.agents.result(run)
    assert result.status == AgentStatus.COMPLETED, result.error
    assert "schema is invalid" in (result.final_answer or "")
