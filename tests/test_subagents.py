"""Sub-agents: an agent used as a tool runs as a child workflow with its own history,
budgets and approvals; its answer is the tool's result."""

from __future__ import annotations

import json

from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel


async def child_waiting(h: Harness, parent: str) -> dict | None:  # type: ignore[type-arg]
    """The child's pending approval, as `keel pending` lists it."""
    _, out, _ = await keel(h, "pending", "--json")
    return next((p for p in json.loads(out) if p["run_id"].startswith(parent + ".")), None)


async def test_approving_the_child_with_keel_approve_finishes_both(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("boss", "delegate charge 30", user="dana")
        pending = await wait_for(lambda: child_waiting(harness, run))
        child = pending["run_id"]
        assert pending["tool"] == "charge" and pending["arguments"]["amount"] == 30
        parent = await harness.agents.get_state(run)
        assert parent.status == AgentStatus.RUNNING  # waiting on its tool, not on a person
        code, out, err = await keel(harness, "approve", child, pending["call_id"], "--as", "alice")
        assert code == 0, err
        result = await harness.agents.result(run, timeout=60)
        parent = await harness.agents.get_state(run)
        child_state = await harness.agents.get_state(child)
    assert result.status == AgentStatus.COMPLETED
    assert child_state.status == AgentStatus.COMPLETED and child_state.user == "dana"
    assert child_state.agent == "shop" and child_state.transcript[1].content == "charge 30"
    # the child's answer is the parent's tool result; the parent records the delegation
    assert parent.transcript[3].role == "tool"
    assert parent.transcript[3].content == child_state.final_answer
    assert [e.tool for e in parent.effects] == ["ask_shop"]
    assert [e.tool for e in child_state.effects] == ["charge"]
    (refund,) = harness.ledger.rows("refunds")
    assert refund["amount"] == 30
    assert refund["idempotency_key"] == child_state.effects[0].idempotency_key


async def test_cancelling_the_parent_cancels_the_child(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("boss", "delegate charge 30")
        child = (await wait_for(lambda: child_waiting(harness, run)))["run_id"]
        await harness.agents.cancel(run)
        result = await harness.agents.result(run, timeout=60)
        child_result = await harness.agents.result(child, timeout=60)
        child_state = await harness.agents.get_state(child)
    assert result.status == AgentStatus.CANCELLED
    assert child_result.status == AgentStatus.CANCELLED
    assert child_state.pending_approvals == [] and harness.ledger.rows("refunds") == []


async def test_a_child_that_fails_is_a_tool_error_the_parent_sees(harness: Harness) -> None:
    harness.model.set_faults([{"kind": "400", "count": 1}])
    async with harness.running():
        run = await harness.start("boss", "delegate charge 5")
        result = await harness.agents.result(run, timeout=60)
    # the 400 hit the parent's first call: the parent fails, never starts a child
    assert result.status == AgentStatus.FAILED
    harness.model.set_faults([{"kind": "400", "count": 1, "when": {"last_user": "^charge 5$"}}])
    async with harness.running():
        run = await harness.start("boss", "delegate charge 5")
        result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.COMPLETED
    assert "sub-agent shop" in (result.final_answer or "")
    assert "failed" in (result.final_answer or "") and "400" in (result.final_answer or "")
