"""A worker killed with SIGKILL mid-run: a new one finishes, nothing done twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for


def requests_at_step(h: Harness, n_messages: int, tools: str = "charge") -> int:
    """How many chat requests carried a conversation of this length, offering this tool
    (one per model step of the runs that have it)."""
    return sum(
        1
        for r in h.model.requests()
        if len(r["body"]["messages"]) == n_messages
        and any(t["function"]["name"] == tools for t in r["body"].get("tools", []))
    )


@asynccontextmanager
async def killable_worker(h: Harness) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker in a process of its own, SIGKILLed on the way out if still alive."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.worker_process",
        "--address",
        h.client.service_client.config.target_host,
        "--task-queue",
        h.settings.task_queue,
        "--model-url",
        h.model.url,
        "--ledger",
        str(h.ledger.path),
        cwd=os.getcwd(),
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def kill_while_held(h: Harness, proc: asyncio.subprocess.Process, gate: str) -> None:
    """SIGKILL the worker while a model call waits at the scripted model's gate, then let
    the gate go: the call that was in flight is the only one asked again."""
    await wait_for(lambda: h.model.held(gate) >= 1, timeout=60)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    h.model.release(gate)


async def test_sigkilled_worker_is_replaced_without_repeating_work(harness: Harness) -> None:
    async with killable_worker(harness) as proc:
        run = await harness.start("calc", "crash test")
        # step 1 (charge 10) completed and its effect committed; step 2 is held: kill
        await kill_while_held(harness, proc, "crash")
        assert len(harness.ledger.rows("refunds")) == 1

    async with harness.running():
        result = await harness.agents.result(run, timeout=90)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "The sum is 42."
    assert requests_at_step(harness, 2) == 1  # step 1 ran once
    assert requests_at_step(harness, 4) == 2  # step 2 was in flight when killed: asked again
    refunds = harness.ledger.rows("refunds")
    assert len(refunds) == 1 and refunds[0]["amount"] == 10
    assert [e.tool for e in state.effects] == ["charge"]
    assert refunds[0]["idempotency_key"] == state.effects[0].idempotency_key


async def test_sigkill_during_a_sub_agent_step_loses_nothing(harness: Harness) -> None:
    async with killable_worker(harness) as proc:
        run = await harness.start("boss", "compute crash test")
        # the child run charged once and holds its second model step: kill the worker
        await kill_while_held(harness, proc, "crash")

    async with harness.running():
        result = await harness.agents.result(run, timeout=90)
        parent = await harness.agents.get_state(run)
        (child_id,) = await wait_for(lambda: _children(harness, run))
        child = await harness.agents.get_state(child_id)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "Done: The sum is 42."
    (call,) = parent.transcript[2].tool_calls
    assert call.name == "ask_calc"
    assert child.status == AgentStatus.COMPLETED and child.final_answer == "The sum is 42."
    assert requests_at_step(harness, 2, "ask_calc") == 1  # the parent's step 1: once
    assert requests_at_step(harness, 2) == 1  # the child's step 1: once
    assert requests_at_step(harness, 4) == 2  # the child's step 2, in flight: asked again
    refunds = harness.ledger.rows("refunds")
    assert len(refunds) == 1 and refunds[0]["idempotency_key"] == child.effects[0].idempotency_key


async def _children(h: Harness, run: str) -> list[str]:
    return [wf.id async for wf in h.client.list_workflows(f"ParentWorkflowId = '{run}'")]


async def test_a_dead_workers_long_tool_is_retried_within_seconds(harness: Harness) -> None:
    """The tool never heartbeats and may take 120 s; Keel heartbeats for it, so its retry
    on a new worker does not wait out that timeout (nor the SDK's 10 s sticky queue)."""
    async with killable_worker(harness) as proc:
        run = await harness.start("calc", "take a long nap")
        await wait_for(lambda: harness.ledger.rows("outbox"), timeout=60)  # the nap started
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    async with harness.running():
        # bounded well below the tool's 120 s timeout: this fails if the retry waits it out
        result = await harness.agents.result(run, timeout=30)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == 'Done: {"napped": 2}'
