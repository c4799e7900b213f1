"""Forking a run after step N (`keel fork`): the new run starts from the origin's state after
that step, inherits its effects up to there without redoing them, and makes its own keys."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from keel.chaos.agent import AGENTS, DONE_ANSWER, ChaosLedger, chaos_rules, first_message, op_of
from keel.client.api import FORK_MEMO, AgentClient, KeelClientError
from keel.client.cli import parser
from keel.testing import AgentEnvironment
from keel.workflows.models import AgentStatus, ChatMessage, ForkOrigin, Policy, RunState

GATE = "fork-old"  # holds the origin's model call for step 3


def rules() -> dict[str, Any]:
    """The chaos agent's script, and a gate before the origin's third transfer: the origin
    is still running while the test forks it (a fork's own requests follow a user message,
    so they pass)."""
    r = chaos_rules(0.0)
    nxt = next(x for x in r["rules"] if x["name"] == "next transfer")
    held = {
        "name": "held before transfer 3",
        "when": {**nxt["when"], "last_tool_result": r"\"next\": (?P<n>3)\b"},
        "reply": {**nxt["reply"], "hold": GATE},
    }
    r["rules"].insert(0, held)
    return r


@pytest_asyncio.fixture(loop_scope="session")
async def forks(env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[AgentEnvironment]:
    ledger = ChaosLedger(tmp_path / "ledger.db")
    async with AgentEnvironment(env.client, AGENTS, rules(), resources=ledger) as e:
        e.ledger = ledger  # type: ignore[attr-defined]
        yield e


async def origin(e: AgentEnvironment, of: int = 4) -> tuple[str, str]:
    """Start a chaos run of `of` transfers of 5 (held before its third); its id and name."""
    name = f"fork-{uuid.uuid4().hex[:8]}"
    run = await e.start("chaos", first_message(name, of, 5))
    await e.model.wait_held(GATE)
    return run, name


def said(messages: list[ChatMessage]) -> list[tuple[str, str | None, str | None]]:
    return [(m.role, m.content, m.tool_call_id) for m in messages]


def attempts(e: AgentEnvironment, key: str) -> int:
    return sum(1 for a in e.ledger.rows("attempts") if a["idempotency_key"] == key)  # type: ignore[attr-defined]


async def test_fork_a_completed_run_after_step_2(forks: AgentEnvironment) -> None:
    e = forks
    run, name = await origin(e)
    e.model.release(GATE)
    assert (await e.agents.result(run, 60)).final_answer == DONE_ANSWER.format(of=4)
    old = await e.agents.get_state(run)
    assert [x.step for x in old.effects] == [1, 2, 3, 4]

    fork = await e.agents.fork(run, 2, "go on")
    result = await e.agents.result(fork, 60)
    new = await e.agents.get_state(fork)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == DONE_ANSWER.format(
        of=4
    )

    # the transcript up to the end of step 2's tool results, then the fork's own message
    cut = next(i for i, m in enumerate(old.transcript) if m.step == 3)
    assert said(new.transcript[:cut]) == said(old.transcript[:cut])
    assert new.transcript[cut].role == "user" and new.transcript[cut].content == "go on"
    assert new.forked_from == ForkOrigin(run_id=run, step=2)
    assert [m.step for m in new.transcript if m.role == "assistant"] == [1, 2, 3, 4, 5]
    # usage of steps 1..2 carried over, then the fork's own
    before = sum(m.usage.total_tokens for m in old.transcript if m.usage and m.step <= 2)
    after = sum(m.usage.total_tokens for m in new.transcript if m.usage and m.step > 2)
    assert new.usage.total_tokens == before + after > before

    # effects 1..2: inherited, naming the origin, done once; 3..4: the fork's, new keys
    assert [(x.idempotency_key, x.run_id) for x in new.inherited_effects] == [
        (x.idempotency_key, run) for x in old.effects[:2]
    ]
    assert all(attempts(e, x.idempotency_key) == 1 for x in old.effects[:2])
    assert [x.step for x in new.effects] == [3, 4]
    old_keys = {x.idempotency_key for x in old.effects}
    assert not old_keys & {x.idempotency_key for x in new.effects}
    # the origin's transfers 3 and 4 are not undone: the fork made them again, as new effects
    rows = [r for r in e.ledger.rows("effects") if r["run"] == name]  # type: ignore[attr-defined]
    assert sorted(r["op"] for r in rows) == sorted(op_of(name, n) for n in (1, 2, 3, 3, 4, 4))
    desc = await e.client.get_workflow_handle(fork).describe()
    assert (await desc.memo_value(FORK_MEMO)) == {"run_id": run, "step": 2, "current_spec": False}


async def test_fork_a_running_run_and_bad_steps(forks: AgentEnvironment) -> None:
    e = forks
    run, _ = await origin(e)  # held in step 3's model call
    try:
        fork = await e.agents.fork(run, 2, "go on")
        assert (await e.agents.result(fork, 60)).final_answer == DONE_ANSWER.format(of=4)
        # step 3 is in flight in the origin: no state after it yet
        unfinished = await e.agents.fork(run, 3, "go on")
        ended = await e.agents.result(unfinished, 60)
        assert ended.status == AgentStatus.FAILED
        assert "cannot fork: step 3 of run" in (ended.error or "")
        assert "has not finished" in (ended.error or "")
        for bad, why in ((0, "1 or more"), (4, r"has made 3 step\(s\)")):
            with pytest.raises(KeelClientError, match=why):
                await e.agents.fork(run, bad, "go on")
    finally:
        e.model.release(GATE)
    assert (await e.agents.result(run, 60)).final_answer == DONE_ANSWER.format(of=4)


async def test_fork_without_message_goes_on_from_step(forks: AgentEnvironment) -> None:
    e = forks
    run, _ = await origin(e, of=3)
    e.model.release(GATE)
    await e.agents.result(run, 60)
    fork = await e.agents.fork(run, 1)
    assert (await e.agents.result(fork, 60)).final_answer == DONE_ANSWER.format(of=3)
    new: RunState = await e.agents.get_state(fork)
    assert [m.role for m in new.transcript].count("user") == 1  # no message of its own
    assert [x.step for x in new.effects] == [2, 3]
    # a fork of the fork inherits the origin's step 1 and the fork's step 2, each by its run
    again = await e.agents.fork(fork, 2)
    assert (await e.agents.result(again, 60)).final_answer == DONE_ANSWER.format(of=3)
    third = await e.agents.get_state(again)
    assert [(x.step, x.run_id) for x in third.inherited_effects] == [(1, run), (2, fork)]
    assert [x.step for x in third.effects] == [3]


async def test_only_who_may_see_a_run_forks_it(forks: AgentEnvironment) -> None:
    e = forks
    run, _ = await origin(e, of=3)
    e.model.release(GATE)
    await e.agents.result(run, 60)
    # the client refuses at once for a caller its policy does not let see the run ...
    policy = Policy(roles={"clerk": {"agents": ["*"]}}, default_roles=["clerk"])
    bob = AgentClient(e.client, e.settings, as_user="bob", policy=policy)
    with pytest.raises(KeelClientError, match="'bob' may not see run"):
        await bob.fork(run, 1, "go on")
    # ... and the worker refuses a fork for a user who may not see it, whoever asks
    operator = AgentClient(e.client, e.settings, as_user=None)
    operator.as_user = None
    fork = await operator.fork(run, 1, "go on", user="mallory")
    ended = await e.agents.result(fork, 60)
    assert ended.status == AgentStatus.FAILED
    assert "user 'mallory' may not see run" in (ended.error or "")


def test_the_cli_names_the_step_and_the_message() -> None:
    a = parser().parse_args(["fork", "run-1", "--at-step", "3", "--message", "plan B"])
    assert (a.run, a.at_step, a.message, a.current_spec) == ("run-1", 3, "plan B", False)
    with pytest.raises(SystemExit):
        parser().parse_args(["fork", "run-1"])  # the step is required
