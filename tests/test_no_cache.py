"""The main paths with no workflow cache: every workflow task replays the run's history
from the start, so any non-determinism in Keel's code fails here."""

from __future__ import annotations

from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for


async def test_the_main_paths_replay_on_every_task(harness: Harness) -> None:
    async with harness.worker(max_cached_workflows=0):
        tools = await harness.start("calc", "add 2 and 3")
        approval = await harness.start("shop", "charge 30")
        interrupted = await harness.start("calc", "use slow tools")
        delegated = await harness.start("boss", "delegate charge 7")
        req = await wait_for(lambda: _pending(harness, approval))
        await harness.agents.approve(approval, req.call_id, "alice", edit={"amount": 25})
        await wait_for(lambda: _tools_running(harness, interrupted))
        await harness.agents.send_message(interrupted, "say hello", "interrupt")
        results = {
            run: await harness.agents.result(run, timeout=90)
            for run in (tools, approval, interrupted, delegated)
        }
    assert results[tools].final_answer == "The sum is 5."
    assert results[approval].status == AgentStatus.COMPLETED
    assert results[interrupted].final_answer == "Hello!"
    assert results[delegated].status == AgentStatus.COMPLETED
    assert sorted(r["amount"] for r in harness.ledger.rows("refunds")) == [7, 25]


async def _pending(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s.pending_approvals[0] if s.pending_approvals else None


async def _tools_running(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.transcript and s.transcript[-1].tool_calls else None
