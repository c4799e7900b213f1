"""A run flooded by its clients stays healthy: resume signals, decisions and refused messages
by the tens of thousands leave its histories under Temporal's limits and its carried state
under a fixed size, while the whole record stays readable (`AgentClient.record`).

The suite floods one run with 10,000 signals: 5,000 resume signals, 2,500 decisions and
2,500 refused messages (KEEL_FLOOD_RESUMES scales them); `python -m bench.flood` runs
100,000 resume signals, 10,000 decisions and 10,000 refused messages.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import pytest_asyncio
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from bench.flood import chain, recorded  # what the bench reads, read the same way
from keel.demo.agent import Ledger
from keel.testing import ScriptedModelServer, start_local_temporal
from keel.workflows.models import (
    SIGNAL_DECIDE,
    SIGNAL_MESSAGE,
    SIGNAL_RESUME,
    AgentStatus,
    AuditKind,
)
from tests.conftest import Harness, wait_for

FLOOD_RESUMES = int(os.environ.get("KEEL_FLOOD_RESUMES", "5000"))
FLOOD_DECISIONS = FLOOD_RESUMES // 2
FLOOD_MESSAGES = FLOOD_RESUMES // 2
# what continue-as-new may carry of a run whose transcript is a few messages: the record's
# tails, the retained events, the dedupe window (keel.workflows.archive bounds each)
CARRIED_BOUND = 400_000
# Temporal's defaults: a history warns at 10,240 events and 10 MB (and fails at 51,200 / 50 MB)
HISTORY_EVENTS_WARN = 10_240
HISTORY_BYTES_WARN = 10 * 1024 * 1024
AT_ONCE = 500  # signals in flight together
# A wave is what one workflow task can take: the SDK handles each signal in its own task, and
# an activation that runs past its deadlock detector (2 s) fails and is retried with the
# same signals; clients faster than the worker are absorbed wave by wave
WAVE = 1000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def real_limits() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of its own, with Temporal's default history limits and suggestions (the
    session's server suggests continue-as-new unusually early)."""
    async with await start_local_temporal() as e:
        yield e


@pytest.fixture
def flood(real_limits: WorkflowEnvironment, model: ScriptedModelServer, ledger: Ledger) -> Harness:
    return Harness(real_limits, model, ledger)


async def send_all(h: Harness, run: str, sends: list[Callable[[], Awaitable[Any]]]) -> int:
    """Send concurrently, AT_ONCE at a time, in waves of WAVE: after each wave, wait until
    the run has recorded it (one audit entry each). Returns how many the server accepted."""
    accepted = 0
    for w in range(0, len(sends), WAVE):
        before = await recorded(h, run)
        sent = 0
        for i in range(w, min(w + WAVE, len(sends)), AT_ONCE):
            batch = [send() for send in sends[i : min(i + AT_ONCE, w + WAVE, len(sends))]]
            done = await asyncio.gather(*batch, return_exceptions=True)
            errors = [d for d in done if isinstance(d, BaseException)]
            if errors and not all(isinstance(e, RPCError) for e in errors):
                raise errors[0]
            sent += len(done) - len(errors)
        accepted += sent
        await wait_for(partial(_at_least, h, run, before + sent), timeout=300, every=0.2)
    return accepted


async def _at_least(h: Harness, run: str, n: int) -> bool:
    return await recorded(h, run) >= n


@pytest.mark.timeout(900)
async def test_flood_of_signals_to_a_parked_run(flood: Harness) -> None:
    h = flood
    async with h.running():
        run = await h.start("shop-open", "charge 30")
        state = await wait_for(lambda: _pending(h, run), timeout=60)
        call = state.pending_approvals[0].call_id
        handle = h.client.get_workflow_handle(run)
        resumes = await send_all(
            h, run, [lambda: handle.signal(SIGNAL_RESUME) for _ in range(FLOOD_RESUMES)]
        )
        # decisions: for calls that do not exist (some sent twice), and for the open call by
        # someone who may not decide it; all refused, most of them by the rate of decisions
        decisions = await send_all(
            h,
            run,
            [
                partial(
                    handle.signal,
                    SIGNAL_DECIDE,
                    {
                        "call_id": call if i % 2 else f"nope-{i % 4000}",
                        "decision": "approve",
                        "approver": "mallory",
                    },
                )
                for i in range(FLOOD_DECISIONS)
            ],
        )
        messages = await send_all(
            h,
            run,
            [
                partial(handle.signal, SIGNAL_MESSAGE, {"text": " ", "id": f"empty-{i}"})
                for i in range(FLOOD_MESSAGES)
            ],
        )
        # still healthy: a real message joins the turn, a real approval lets the call run
        await h.agents.send_message(run, "say hello")

        async def approve() -> bool:
            try:
                return (await h.agents.approve(run, call, "alice")).accepted
            except Exception:  # refused while the flood spent the decision rate
                return False

        assert await wait_for(approve, timeout=120, every=0.5)
        done = await wait_for(lambda: _idle(h, run), timeout=120)
        assert [m.content for m in done.transcript if m.role == "assistant"][-1] == ("Hello!")
        assert [e.tool for e in done.effects] == ["charge"]
        record = await h.agents.record(run)
        histories = await chain(h.client, run)
    assert resumes == FLOOD_RESUMES
    kinds = Counter(e.kind for e in record.audit)
    assert kinds[AuditKind.RESUME] == resumes
    assert kinds[AuditKind.MESSAGE_REJECTED] == messages
    assert kinds[AuditKind.DECISION_REFUSED] >= decisions  # and the approvals refused by rate
    assert kinds[AuditKind.APPROVED] == 1 and record.audit_dropped == 0
    assert [d.outcome for d in record.decisions] == ["approved"]
    assert len(record.audit) == done.archive.audit.dropped + len(done.audit)
    assert len(histories) > 1 and record.histories == len(histories)
    for events, size, start in histories:
        assert events < HISTORY_EVENTS_WARN and size < HISTORY_BYTES_WARN
        assert start < CARRIED_BOUND
    assert done.status == AgentStatus.IDLE


async def _pending(h: Harness, run: str) -> Any:
    s = await h.agents.get_state(run)
    return s if s.pending_approvals else None


async def _idle(h: Harness, run: str) -> Any:
    s = await h.agents.get_state(run)
    return s if s.status == AgentStatus.IDLE and not s.queued_messages else None
