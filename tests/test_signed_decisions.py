"""Unforgeable decisions: a forged one is refused and the run goes on unharmed; a decision
signed with the approver's key is accepted. Against the real dev server."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from keel.client.api import KeelClientError
from keel.client.signing import sign_decision
from keel.workflows.decisions import DecisionTarget
from keel.workflows.models import (
    SIGNAL_DECIDE,
    AgentState,
    AgentStatus,
    AuditKind,
    DecideInput,
    Decision,
)
from tests.conftest import Harness, wait_for
from tests.policies import KeyPair, key_pair, make_policy, target_of
from tests.test_approvals import pending

KEYS = {name: key_pair() for name in ("alice", "dana", "mallory")}


def _decision(
    run: DecisionTarget, call_id: str, who: str, key: KeyPair | None = None, **kw: object
) -> DecideInput:
    fields: dict[str, object] = {"call_id": call_id, "decision": "approve", "approver": who}
    d = DecideInput.model_validate(fields | kw)
    return sign_decision((key or KEYS[who]).private, d, run, datetime.now(UTC))


async def _refusals(h: Harness, run: str, n: int) -> list[str] | None:
    audit = (await h.agents.get_state(run)).audit
    found = [e.detail for e in audit if e.kind == AuditKind.DECISION_REFUSED]
    return found if len(found) >= n else None


async def test_forged_decisions_are_refused_and_a_signed_one_is_accepted(
    harness: Harness,
) -> None:
    policy = make_policy(KEYS)
    a = harness.agents
    async with harness.worker(policy=policy):
        # two runs asking for the same call (the same conversation: the same call id)
        run = await harness.start("guarded", "charge 30", user="dana")
        other = await harness.start("guarded", "charge 30", user="sam")
        req = (await pending(harness, run)).pending_approvals[0]
        other_req = (await pending(harness, other)).pending_approvals[0]
        call = req.call_id
        assert other_req.call_id == call and req.approver_roles == ["approver"]
        here, there = await target_of(harness.client, run), await target_of(harness.client, other)
        valid_edit = _decision(here, call, "alice", decision="edit", arguments={"amount": 25})
        forged = {
            "no signature": DecideInput(call_id=call, decision=Decision.APPROVE, approver="alice"),
            "wrong key": _decision(here, call, "alice", KEYS["mallory"]),
            "tampered arguments": valid_edit.model_copy(update={"arguments": {"amount": 2500}}),
            "signed for another call": _decision(here, "call_other", "alice").model_copy(
                update={"call_id": call}
            ),
            "signed for another run": _decision(there, call, "alice"),
            "a role that may not approve": _decision(here, call, "mallory"),
            "four-eyes": _decision(here, call, "dana"),
        }
        reasons = {
            "no signature": "unsigned decision refused",
            "wrong key": "does not verify against alice's key",
            "tampered arguments": "does not verify",
            "signed for another call": "does not verify",
            "signed for another run": "does not verify",
            "a role that may not approve": "'mallory' (roles: customer) may not decide",
            "four-eyes": "four-eyes: 'dana' started this run",
        }
        # as updates: refused before anything reaches the history
        for name, d in forged.items():
            with pytest.raises(KeelClientError, match=re.escape(reasons[name])):
                await a.decide(run, d)
        # as signals (anyone with the namespace can send one): recorded as refused
        handle = harness.client.get_workflow_handle(run)
        for d in forged.values():
            await handle.signal(SIGNAL_DECIDE, d)
        refused = await wait_for(lambda: _refusals(harness, run, len(forged)))
        for name, detail in zip(forged, refused, strict=True):
            assert reasons[name] in detail, name
        # the run is unharmed: still waiting on the same request, nothing charged
        state = await a.get_state(run)
        assert state.status == AgentStatus.WAITING_APPROVAL and state.decisions == []
        assert [r.call_id for r in state.pending_approvals] == [call]
        assert harness.ledger.rows("refunds") == []
        # the signature for the other run is good there
        receipt = await a.decide(other, forged["signed for another run"])
        assert receipt.accepted
        # and alice's own signed edit is accepted here; sent again, it is already decided
        receipt = await a.decide(run, valid_edit)
        assert receipt.accepted and receipt.arguments == {"amount": 25, "note": "test"}
        with pytest.raises(KeelClientError, match="already decided"):
            await a.decide(run, valid_edit)
        result = await a.result(run, timeout=30)
        state = await a.get_state(run)
        await a.result(other, timeout=30)
    assert result.status == AgentStatus.COMPLETED
    assert sorted(r["amount"] for r in harness.ledger.rows("refunds")) == [25, 30]
    assert [(d.outcome, d.by, d.signed) for d in state.decisions] == [("edited", "alice", True)]
    assert state.spec is not None and state.spec.policy is not None
    assert state.spec.policy.digest == policy.digest  # the history shows which policy


async def test_unsigned_decisions_where_the_policy_allows_them(harness: Harness) -> None:
    """A policy without keys (the embedded demo's way) still takes plain decisions; roles
    and four-eyes hold all the same."""
    async with harness.worker(policy=make_policy()):
        run = await harness.start("guarded", "charge 30", user="dana")
        call = (await pending(harness, run)).pending_approvals[0].call_id
        with pytest.raises(KeelClientError, match="four-eyes"):
            await harness.agents.approve(run, call, "dana")
        with pytest.raises(KeelClientError, match="'eve' is not a user of policy test-policy"):
            await harness.agents.approve(run, call, "eve")
        receipt = await harness.agents.approve(run, call, "alice")
        result = await harness.agents.result(run, timeout=30)
        state: AgentState = await harness.agents.get_state(run)
    assert receipt.accepted and result.status == AgentStatus.COMPLETED
    assert [(d.by, d.signed) for d in state.decisions] == [("alice", False)]
    assert [r["amount"] for r in harness.ledger.rows("refunds")] == [30]


async def test_too_many_decisions_are_refused_and_nothing_else_changes(harness: Harness) -> None:
    policy = make_policy(decisions_per_second=0.01, decision_burst=3)
    async with harness.worker(policy=policy):
        run = await harness.start("guarded", "charge 30", user="dana")
        call = (await pending(harness, run)).pending_approvals[0].call_id
        handle = harness.client.get_workflow_handle(run)
        for i in range(3):  # three decisions that do not apply spend the run's burst
            bogus = DecideInput(call_id=f"nope-{i}", decision=Decision.APPROVE, approver="alice")
            await handle.signal(SIGNAL_DECIDE, bogus)
        await wait_for(lambda: _refusals(harness, run, 3))
        with pytest.raises(KeelClientError, match="too many decisions: this run takes 3 at once"):
            await harness.agents.approve(run, call, "alice")
        await handle.signal(
            SIGNAL_DECIDE, DecideInput(call_id=call, decision=Decision.APPROVE, approver="alice")
        )
        refused = await wait_for(lambda: _refusals(harness, run, 4))
        state = await harness.agents.get_state(run)
        await harness.agents.cancel(run)
    assert "too many decisions" in refused[-1]
    assert state.status == AgentStatus.WAITING_APPROVAL and state.decisions == []
    assert [r.call_id for r in state.pending_approvals] == [call]
    assert harness.ledger.rows("refunds") == []
