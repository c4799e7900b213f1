"""A worker killed with SIGKILL mid-run: a new one finishes, nothing done twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from keel.workflows.models import AgentStatus

from tests.conftest import Harness, wait_for


def requests_at_step(h: Harness, n_messages: int) -> int:
    """How many chat requests carried a conversation of this length (one per model step)."""
    return sum(1 for r in h.model.requests() if len(r["body"]["messages"]) == n_messages)


async def test_sigkilled_worker_is_replaced_without_repeating_work(harness: Harness) -> None:
    address = harness.client.service_client.config.target_host
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.worker_process",
        "--address",
        address,
        "--task-queue",
        harness.settings.task_queue,
        "--model-url",
        harness.model.url,
        "--ledger",
        str(harness.ledger.path),
        cwd=os.getcwd(),
    )
    try:
        run = await harness.start("calc", "crash test")
        # step 1 (charge 10) completed, the effect committed, step 2 (slow) in flight: kill
        await wait_for(lambda: requests_at_step(harness, 4) >= 1, timeout=60)
        assert len(harness.ledger.rows("refunds")) == 1
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async with harness.running():
        result = await harness.agents.result(run, timeout=90)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "The sum is 42."
    assert requests_at_step(harness, 2) == 1  # step 1 ran once
    assert requests_at_step(harness, 4) == 2  # step 2 was in flight when killed: re-asked once
    refunds = harness.ledger.rows("refunds")
    assert len(refunds) == 1 and refunds[0]["amount"] == 10
    assert [e.tool for e in state.effects] == ["charge"]
    assert refunds[0]["idempotency_key"] == state.effects[0].idempotency_key
