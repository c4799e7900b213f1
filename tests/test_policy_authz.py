"""The worker's policy in real runs: tool allowlists, who may start what, role limits, who
sees which runs, the queued-messages cap and the CLI's signed approvals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError

from keel.activities.registry import load_policy
from keel.client.api import AgentClient, KeelClientError
from keel.workflows.authz import START_REFUSED
from keel.workflows.inbox import MAX_QUEUED_MESSAGES
from keel.workflows.models import (
    SIGNAL_MESSAGE,
    AgentStatus,
    AuditKind,
    MessageInput,
)
from tests.conftest import Harness, wait_for
from tests.policies import BASE, make_policy, policy_data
from tests.test_approvals import pending
from tests.test_cli import keel


async def _activities(h: Harness, run: str) -> int:
    history = await h.client.get_workflow_handle(run).fetch_history()
    scheduled = EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    return sum(e.event_type == scheduled for e in history.events)


async def test_a_tool_outside_the_allowlist_never_runs(harness: Harness) -> None:
    """calc may use add and slow_lookup: the model's charge is refused in the workflow,
    the model is told, the audit trail says so, and no activity is ever scheduled."""
    policy = make_policy()
    async with harness.worker(policy=policy):
        run = await harness.start("calc", "charge 10", user="dana")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
        scheduled = await _activities(harness, run)
    refusal = (
        "Error: the tool 'charge' is not allowed for agent 'calc' by policy test-policy "
        f"({policy.digest[:12]}) (allowed: add, slow_lookup); it was not run"
    )
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == f"The tool reported: {refusal}"
    assert harness.ledger.rows("refunds") == [] and state.effects == []
    assert [(e.kind, e.call_id) for e in state.audit if e.kind == AuditKind.TOOL_REFUSED] == [
        (AuditKind.TOOL_REFUSED, state.transcript[2].tool_calls[0].id)
    ]
    assert scheduled == 2  # the two model calls; no tool
    assert state.spec is not None and [t.name for t in state.spec.tools] == ["add", "slow_lookup"]


async def test_a_user_may_start_only_the_agents_their_roles_allow(harness: Harness) -> None:
    policy = make_policy()
    async with harness.worker(policy=policy):
        # a client that knows the policy refuses at once, and starts nothing
        guarded = AgentClient(harness.client, harness.settings, policy=policy, as_user="sam")
        with pytest.raises(KeelClientError, match="user 'sam' may not start agent 'six'"):
            await guarded.start("six", "add 1 and 2")
        with pytest.raises(KeelClientError, match="'sam' may start runs only as themselves"):
            await guarded.start("calc", "add 1 and 2", user="dana")
        # any other client: the run itself refuses, at once, and ends failed
        run = await harness.start("six", "add 1 and 2", user="sam")
        with pytest.raises(WorkflowFailureError) as failure:
            await harness.client.get_workflow_handle(run).result()
        state = await harness.agents.get_state(run)
        allowed = await harness.start("calc", "add 1 and 2", user="sam")
        assert (await harness.agents.result(allowed, timeout=30)).final_answer == "The sum is 3."
    assert getattr(failure.value.cause, "type", None) == START_REFUSED
    assert state.status == AgentStatus.FAILED and state.step == 0
    assert state.error is not None and "user 'sam' may not start agent 'six'" in state.error


async def test_a_roles_limits_lower_the_agents(harness: Harness) -> None:
    users = {**BASE["users"], "fru": {"roles": ["frugal"]}}
    async with harness.worker(policy=make_policy(users=users)):
        run = await harness.start("chat", "loop forever", user="fru")
        result = await harness.agents.result(run, timeout=30)
    assert result.status == AgentStatus.BUDGET_EXHAUSTED and result.steps == 1
    assert "step budget spent: 1 of 1" in (result.error or "")


async def test_list_and_pending_show_only_what_the_caller_may_see(harness: Harness) -> None:
    policy = make_policy()

    def client(user: str) -> AgentClient:
        return AgentClient(harness.client, harness.settings, policy=policy, as_user=user)

    async with harness.worker(policy=policy):
        runs = {}
        for user in ("dana", "sam", "gail"):
            runs[user] = await client(user).start(
                "guarded", "charge 30", run_id=f"tenancy-{user}-{harness.settings.task_queue}"
            )
            await pending(harness, runs[user])
        mine = set(runs.values())

        async def listed(user: str, expect: int) -> set[str] | None:
            found = {r.run_id for r in await client(user).list()} & mine
            return found if len(found) == expect else None

        async def waiting(user: str) -> set[str]:
            return {p.run_id for p in await client(user).pending()} & mine

        assert await wait_for(lambda: listed("root", 3)) == mine
        assert await wait_for(lambda: listed("sam", 1)) == {runs["sam"]}
        assert await wait_for(lambda: listed("alice", 2)) == {runs["dana"], runs["sam"]}
        assert await listed("gail", 1) == {runs["gail"]}
        assert await waiting("alice") == {runs["dana"], runs["sam"]}
        assert await waiting("gail") == {runs["gail"]}
        assert await waiting("root") == mine
        # the tenant is on the run, for operators' filters too
        query = f"AgentTenant = 'acme' AND TaskQueue = '{harness.settings.task_queue}'"
        acme = {w.id async for w in harness.client.list_workflows(query)}
        assert acme == {runs["dana"], runs["sam"]}
        # a client that does not know the policy: the run sets its tenant from its own
        plain = await harness.start("guarded", "charge 30", user="dana")
        await pending(harness, plain)

        async def tagged() -> bool:
            q = f"AgentTenant = 'acme' AND WorkflowId = '{plain}'"
            return bool([w async for w in harness.client.list_workflows(q)])

        assert await wait_for(tagged)
        for run in [*mine, plain]:
            await harness.agents.cancel(run)


async def test_queued_messages_are_capped(harness: Harness) -> None:
    async with harness.worker(policy=make_policy()):
        run = await harness.start("guarded", "charge 30", user="dana")
        call = (await pending(harness, run)).pending_approvals[0].call_id
        handle = harness.client.get_workflow_handle(run)
        for i in range(MAX_QUEUED_MESSAGES):
            await handle.signal(SIGNAL_MESSAGE, MessageInput(text=f"note {i}", id=f"m{i}"))

        async def queued() -> bool:
            state = await harness.agents.get_state(run)
            return len(state.queued_messages) == MAX_QUEUED_MESSAGES

        await wait_for(queued)
        receipt = await harness.agents.send_message(run, "one more")
        assert receipt.status == "rejected"
        assert receipt.reason == (
            f"{MAX_QUEUED_MESSAGES} messages are already queued; send it once they are read"
        )
        await harness.agents.approve(run, call, "alice")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert [r["amount"] for r in harness.ledger.rows("refunds")] == [30]
    users = [m.content for m in state.transcript if m.role == "user"]
    assert users == ["charge 30"] + [f"note {i}" for i in range(MAX_QUEUED_MESSAGES)]


async def test_the_cli_signs_with_the_approvers_key(harness: Harness, tmp_path: Path) -> None:
    code, out, err = await keel(
        None, "keygen", "--signing", "--id", "alice", "--out", str(tmp_path / "alice.key")
    )
    assert code == 0, err
    public = out.split('public_key = "')[1].split('"')[0]  # the line to paste in the policy
    data = policy_data()
    data["users"]["alice"]["public_key"] = public
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(data))
    async with harness.worker(policy=load_policy(policy_file)):
        run = await harness.start("guarded", "charge 30", user="dana")
        call = (await pending(harness, run)).pending_approvals[0].call_id
        with pytest.raises(KeelClientError, match="unsigned decision refused"):
            await harness.agents.approve(run, call, "alice")
        key = str(tmp_path / "alice.key")
        code, out, err = await keel(harness, "approve", run, call, "--as", "alice", "--key", key)
        assert code == 0 and f"approved {call} as alice" in out, err
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert [(d.by, d.signed) for d in state.decisions] == [("alice", True)]
