"""The live event stream: every event once, in order, for late watchers too, across a worker
SIGKILL and continue-as-new."""

from __future__ import annotations

import asyncio
import signal

from keel.workflows.events import EventKind, RunEvent
from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel
from tests.test_crash import killable_worker


class Watcher:
    """Collects a run's events in the background, as `keel watch` reads them."""

    def __init__(self, h: Harness, run: str, from_offset: int = 0) -> None:
        self.seen: list[tuple[int, RunEvent]] = []
        self.task = asyncio.create_task(self._watch(h, run, from_offset))

    async def _watch(self, h: Harness, run: str, from_offset: int) -> None:
        async for offset, event in h.agents.events(run, from_offset=from_offset):
            self.seen.append((offset, event))

    def kinds(self) -> list[str]:
        return [e.kind.value for _, e in self.seen]


def _in_order_once(seen: list[tuple[int, RunEvent]]) -> None:
    assert [o for o, _ in seen] == list(range(len(seen))), "offsets not 0..n-1, once each"


async def test_a_late_watcher_sees_every_event_once_in_order(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        await wait_for(lambda: _pending(harness, run))
        late = Watcher(harness, run)  # connects while the run waits for a person
        await wait_for(lambda: EventKind.APPROVAL_REQUESTED.value in late.kinds())
        state = await harness.agents.get_state(run)
        await harness.agents.approve(run, state.pending_approvals[0].call_id, "alice")
        await asyncio.wait_for(late.task, 30)  # it ends with the run
        closed = Watcher(harness, run)  # and one that comes after the end reads it all
        await asyncio.wait_for(closed.task, 30)
    _in_order_once(late.seen)
    # the same events (their `at` is the time of the workflow task that emitted them: a
    # replay after a local activity may see an earlier one)
    assert [(o, e.model_copy(update={"at": None})) for o, e in late.seen] == [
        (o, e.model_copy(update={"at": None})) for o, e in closed.seen
    ]
    kinds = late.kinds()
    assert kinds[0] == "status" and late.seen[0][1].status == "running"
    assert kinds[-1] == "ended" and late.seen[-1][1].status == "completed"
    assert kinds == [
        "status",  # running
        "model_reply",  # charge(amount=30)
        "approval_requested",
        "status",  # waiting_approval
        "approval_decided",
        "status",  # running
        "tool_started",
        "tool_result",
        "model_reply",  # the answer
        "status",  # completed
        "ended",
    ]
    events = {e.kind: e for _, e in late.seen}
    asked = events[EventKind.APPROVAL_REQUESTED]
    assert (asked.tool, asked.detail) == ("charge", "charges above 20 need approval")
    assert '"amount": 30' in asked.arguments
    assert (events[EventKind.APPROVAL_DECIDED].detail, events[EventKind.APPROVAL_DECIDED].by) == (
        "approved",
        "alice",
    )
    statuses = [e.status for _, e in late.seen if e.kind == EventKind.STATUS]
    assert statuses == ["running", "waiting_approval", "running", "completed"]


async def test_events_survive_a_sigkill_and_continue_as_new(harness: Harness) -> None:
    # the session's server suggests continue-as-new after 120 events: 30 steps take several
    # histories; the worker is killed once the watcher has seen step 5
    async with killable_worker(harness) as proc:
        run = await harness.start("long", "loop forever")
        watcher = Watcher(harness, run)
        await wait_for(
            lambda: any(e.kind == EventKind.MODEL_REPLY and e.step >= 5 for _, e in watcher.seen),
            timeout=60,
        )
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    async with harness.running():
        result = await harness.agents.result(run, timeout=120)
        await asyncio.wait_for(watcher.task, 60)
    assert result.status == AgentStatus.BUDGET_EXHAUSTED
    _in_order_once(watcher.seen)
    steps = [e.step for _, e in watcher.seen if e.kind == EventKind.MODEL_REPLY]
    assert steps == list(range(1, 31))
    assert watcher.kinds().count("ended") == 1
    runs = [w async for w in harness.client.list_workflows(f"WorkflowId = '{run}'")]
    assert len(runs) >= 2  # it did continue-as-new


async def test_no_client_can_publish_into_a_runs_log(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        await wait_for(lambda: _pending(harness, run))
        handle = harness.client.get_workflow_handle(run)
        forged = {"items": [{"topic": "keel.events", "data": "AAAA"}], "publisher_id": "x"}
        await handle.signal("__temporal_workflow_stream_publish", forged)
        state = await wait_for(lambda: _refused(harness, run))
        events = [e async for e in harness.agents.events(run, follow=False)]
    assert "only the run itself publishes its events" in state.audit[-1].detail
    assert all(e.kind != EventKind.ENDED for _, e in events)
    _in_order_once(events)


async def _pending(h: Harness, run: str) -> bool:
    return bool((await h.agents.get_state(run)).pending_approvals)


async def _refused(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if any(e.kind == "signal_refused" for e in s.audit) else None


async def test_keel_watch_and_transcript(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        await wait_for(lambda: _pending(harness, run))
        call = (await harness.agents.get_state(run)).pending_approvals[0].call_id
        code, out, err = await keel(harness, "watch", run, "--no-follow")
        assert code == 0, err
        assert "APPROVAL NEEDED charge" in out and f"keel approve {run} {call} --as NAME" in out
        code, table, err = await keel(harness, "watch", "--once")
        assert run in table and "waiting_approval" in table
        await harness.agents.approve(run, call, "alice")
        code, out, err = await keel(harness, "watch", run)  # follows until the run ends
        assert code == 0, err
        lines = out.strip().splitlines()
        assert "ENDED completed" in lines[-1]
        assert any(f"approval of charge [{call}]: approved by alice" in x for x in lines)
        code, out, err = await keel(harness, "transcript", run)
    assert code == 0, err
    assert f"tool charge [{call}]:" in out
    assert out.strip().splitlines()[-1].startswith("-- completed, 2 steps, ")
