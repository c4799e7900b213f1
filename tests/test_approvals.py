"""Human approvals: approve, reject, edit, refusals, several at once, no worker running."""

from __future__ import annotations

import asyncio
import json

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.common import RawValue

from keel.client.api import KeelClientError
from keel.workflows.models import AgentStatus, RunState
from tests.conftest import Harness, wait_for


async def pending(h: Harness, run: str, n: int = 1) -> RunState:
    async def check() -> RunState | None:
        s = await h.agents.get_state(run)
        return s if len(s.pending_approvals) >= n else None

    return await wait_for(check)


async def test_approve(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        state = await pending(harness, run)
        req = state.pending_approvals[0]
        assert state.status == AgentStatus.WAITING_APPROVAL
        assert (req.tool, req.arguments["amount"], req.approvers) == (
            "charge",
            30,
            ["alice", "bob"],
        )
        assert req.reason == "charges above 20 need approval"
        assert req.expires_at > req.requested_at
        assert harness.ledger.rows("refunds") == []
        # the Web UI's and the CLI's way of finding runs that wait for a person
        query = (
            f"WorkflowId = '{run}' AND AgentStatus = 'waiting_approval' AND PendingApprovals = 1"
        )
        found = await wait_for(lambda: _count(harness, query), timeout=15)
        assert found == 1
        # the Web UI shows what is to be approved, and what the run is about
        handle = harness.client.get_workflow_handle(run)
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        assert f'`charge(amount=30.0, note="test")` (`{req.call_id}`)' in (metadata.current_details)
        assert await (await handle.describe()).static_summary() == "shop for tester: charge 30"
        listed = await harness.agents.pending()
        assert [p.call_id for p in listed if p.run_id == run] == [req.call_id]
        receipt = await harness.agents.approve(run, req.call_id, "alice")
        assert receipt.accepted
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    refunds = harness.ledger.rows("refunds")
    assert [r["amount"] for r in refunds] == [30]
    assert [e.tool for e in state.effects] == ["charge"]
    assert [(a.kind, a.actor) for a in state.audit if a.kind == "approved"] == [
        ("approved", "alice")
    ]


async def _count(h: Harness, query: str) -> int:
    return len([w async for w in h.client.list_workflows(query)])


async def test_reject_reason_reaches_the_model(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        req = (await pending(harness, run)).pending_approvals[0]
        await harness.agents.reject(run, req.call_id, "bob", "too much for a test")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.final_answer == "The tool reported: Rejected by bob: too much for a test"
    assert harness.ledger.rows("refunds") == [] and state.effects == []


async def test_edit_applies_changed_arguments(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        req = (await pending(harness, run)).pending_approvals[0]
        with pytest.raises(KeelClientError, match="edited arguments are invalid: amount"):
            await harness.agents.approve(run, req.call_id, "alice", edit={"amount": "lots"})
        # an edit names only what changes (as `keel approve --edit '{"amount": 25}'`)
        receipt = await harness.agents.approve(run, req.call_id, "alice", edit={"amount": 25})
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert receipt.arguments == {"amount": 25, "note": "test"}  # what will run, said up front
    assert result.status == AgentStatus.COMPLETED
    assert [(r["amount"], r["reason"]) for r in harness.ledger.rows("refunds")] == [(25, "test")]
    assert state.effects[0].arguments == {"amount": 25, "note": "test"}
    assert [(d.call_id, d.outcome, d.by) for d in state.decisions] == [
        (req.call_id, "edited", "alice")
    ]


async def test_refusals_leave_the_run_unharmed(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        req = (await pending(harness, run)).pending_approvals[0]
        a = harness.agents
        with pytest.raises(KeelClientError, match="no pending approval with call id 'nope'"):
            await a.approve(run, "nope", "alice")
        with pytest.raises(KeelClientError, match="'carol' may not decide"):
            await a.approve(run, req.call_id, "carol")
        # the same refusals as signals: recorded, never raised
        handle = harness.client.get_workflow_handle(run)
        await handle.signal(
            "keel.decide", {"call_id": req.call_id, "decision": "approve", "approver": "carol"}
        )
        await handle.signal(
            "keel.decide", {"call_id": req.call_id, "decision": "maybe", "approver": "x"}
        )
        await handle.signal("keel.decide", "not even an object")
        await handle.signal("keel.decide", RawValue(_raw_payload(b"{broken json")))
        await handle.signal("keel.decide")  # no payload at all
        await handle.signal("keel.decide", RawValue(_raw_payload(b"approve", b"text/plain")))
        await handle.signal("keel.decide", args=[{"call_id": req.call_id}, {"extra": "arg"}])
        await handle.signal("approve_it", {"call_id": req.call_id})  # no such signal
        state = await wait_for(lambda: _audit_kinds(harness, run, 8))
        refused = [k for k in state if k.endswith("refused")]
        assert refused == ["decision_refused"] + ["signal_refused"] * 7
        await a.approve(run, req.call_id, "bob")
        with pytest.raises(KeelClientError, match="already decided"):
            await a.approve(run, req.call_id, "alice")
        result = await a.result(run, timeout=30)
    assert result.status == AgentStatus.COMPLETED
    assert len(harness.ledger.rows("refunds")) == 1


def _raw_payload(data: bytes, encoding: bytes = b"json/plain"):  # type: ignore[no-untyped-def]
    from temporalio.api.common.v1 import Payload

    return Payload(metadata={"encoding": encoding}, data=data)


async def _audit_kinds(h: Harness, run: str, refused: int) -> list[str] | None:
    kinds = [e.kind for e in (await h.agents.get_state(run)).audit]
    return kinds if sum(k.endswith("refused") for k in kinds) >= refused else None


async def test_several_pending_and_others_run(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge twice")
        state = await pending(harness, run)
        # the 5 needs no approval and ran while the 30 waits
        await wait_for(lambda: len(harness.ledger.rows("refunds")) == 1)
        assert [r["amount"] for r in harness.ledger.rows("refunds")] == [5]
        await harness.agents.approve(run, state.pending_approvals[0].call_id, "alice")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert sorted(r["amount"] for r in harness.ledger.rows("refunds")) == [5, 30]
    tool_msgs = [m for m in state.transcript if m.role == "tool"]
    assert [m.tool_call_id for m in tool_msgs] == [c.id for c in state.transcript[2].tool_calls]


async def test_decision_while_no_worker_runs(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 40")
        req = (await pending(harness, run)).pending_approvals[0]
    # the worker is gone; a plain JSON signal is accepted by the server and waits
    handle = harness.client.get_workflow_handle(run)
    await handle.signal(
        "keel.decide", {"call_id": req.call_id, "decision": "approve", "approver": "bob"}
    )
    # the server keeps it: the signal is in the history, and no workflow task has run since
    events = [e.event_type for e in (await handle.fetch_history()).events]
    signaled = events.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED not in events[signaled:]
    assert harness.ledger.rows("refunds") == []
    async with harness.running():
        result = await harness.agents.result(run, timeout=30)
    assert result.status == AgentStatus.COMPLETED
    assert [r["amount"] for r in harness.ledger.rows("refunds")] == [40]


async def test_temporal_cli_plain_json(harness: Harness) -> None:
    """A person with only the `temporal` CLI can decide and send messages."""
    from tests.conftest import binary

    address = harness.client.service_client.config.target_host

    async def temporal(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            binary("temporal"),
            "workflow",
            "signal",
            "--address",
            address,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()

    async with harness.running():
        run = await harness.start("shop-open", "charge 30")
        req = (await pending(harness, run)).pending_approvals[0]
        decision = {"call_id": req.call_id, "decision": "approve", "approver": "alice"}
        await temporal(
            "--workflow-id", run, "--name", "keel.decide", "--input", json.dumps(decision)
        )
        await wait_for(lambda: _status(harness, run, AgentStatus.IDLE))
        message = {"text": "say hello", "policy": "queue"}
        await temporal(
            "--workflow-id", run, "--name", "keel.submit_message", "--input", json.dumps(message)
        )
        state = await wait_for(lambda: _answered(harness, run, "Hello!"))
        await harness.agents.cancel(run)
    assert [r["amount"] for r in harness.ledger.rows("refunds")] == [30]
    assert state.turn == 2


async def _status(h: Harness, run: str, status: AgentStatus) -> bool:
    return (await h.agents.get_state(run)).status == status


async def _answered(h: Harness, run: str, answer: str) -> RunState | None:
    s = await h.agents.get_state(run)
    return s if s.status == AgentStatus.IDLE and s.final_answer == answer else None
