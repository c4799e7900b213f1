"""Schedules: agents started by Temporal Schedules, with an explicit overlap policy."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from keel.client.schedules import SCHEDULED_BY, ScheduleError, parse_every
from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel


async def test_a_schedule_starts_runs_that_carry_its_name(harness: Harness) -> None:
    name = f"nightly-{uuid.uuid4().hex[:6]}"
    schedules = harness.agents.schedules
    # paused, so only the trigger below starts a run (the cron's next time is hours away)
    await schedules.create(
        name, "calc", "add 2 and 3", cron="0 3 * * *", user="ops", overlap="buffer_one", paused=True
    )
    try:
        listed = next(s for s in await schedules.list() if s.name == name)
        assert (listed.agent, listed.message, listed.user) == ("calc", "add 2 and 3", "ops")
        assert (listed.when, listed.overlap, listed.paused) == (
            "cron 0 3 * * *",
            "buffer_one",
            True,
        )
        with pytest.raises(ScheduleError, match="exists"):
            await schedules.create(name, "calc", "again", cron="0 3 * * *")
        async with harness.running():
            await schedules.trigger(name)
            runs = await wait_for(lambda: _runs(harness, f"{SCHEDULED_BY} = '{name}'"))
            run = runs[0].id
            assert run.startswith(f"{name}-")
            result = await harness.agents.result(run, timeout=30)
            desc = await harness.client.get_workflow_handle(run).describe()
        assert result.status == AgentStatus.COMPLETED and "5" in (result.final_answer or "")
        assert await desc.static_summary() == f"calc for ops (schedule {name}): add 2 and 3"
        await schedules.unpause(name)
        assert not next(s for s in await schedules.list() if s.name == name).paused
    finally:
        await schedules.delete(name)
    assert name not in [s.name for s in await schedules.list()]
    with pytest.raises(ScheduleError, match="no schedule named"):
        await schedules.trigger(name)


async def test_bad_schedules_are_refused_clearly(harness: Harness) -> None:
    schedules = harness.agents.schedules
    with pytest.raises(ScheduleError, match="exactly one of --cron and --every"):
        await schedules.create("x", "calc", "hi")
    with pytest.raises(ScheduleError, match="overlap must be one of"):
        await schedules.create("x", "calc", "hi", cron="* * * * *", overlap="sometimes")
    with pytest.raises(ScheduleError, match="refused"):
        await schedules.create(f"bad-{uuid.uuid4().hex[:6]}", "calc", "hi", cron="61 * * * *")
    assert parse_every("15m") == timedelta(minutes=15)
    with pytest.raises(ScheduleError, match="--every takes"):
        parse_every("soon")


async def _runs(h: Harness, query: str) -> list | None:  # type: ignore[type-arg]
    found = [w async for w in h.client.list_workflows(query)]
    return found or None


async def test_the_schedule_commands(harness: Harness) -> None:
    name = f"hourly-{uuid.uuid4().hex[:6]}"
    code, out, err = await keel(
        harness, "schedule", "create", name, "calc", "add 1 and 1", "--every", "1h", "--paused"
    )
    assert code == 0, err
    assert out.strip() == f"schedule {name}: calc on every 1h, overlap skip"
    code, out, err = await keel(harness, "schedule", "list")
    line = next(x for x in out.splitlines() if x.startswith(name))
    assert "[paused] calc for anyone: 'add 1 and 1' every 1h, overlap skip" in line
    assert (await keel(harness, "schedule", "delete", name))[0] == 0
    code, out, err = await keel(harness, "schedule", "trigger", name)
    assert (code, err.strip()) == (1, f"keel: no schedule named {name!r} (keel schedule list)")
    code, out, err = await keel(harness, "schedule", "create", "y", "calc", "hi", "--every", "x")
    assert code == 1 and "Traceback" not in err and "--every takes" in err


async def test_a_schedule_starts_a_loop_of_your_own(harness: Harness) -> None:
    """`loop` as `AgentClient.start` takes it; the schedule is listed as soon as it is made."""
    from examples.helpdesk.workflows import PlanAndExecute

    name = f"plans-{uuid.uuid4().hex[:6]}"
    schedules = harness.agents.schedules
    await schedules.create(
        name, "planner", "plan the week", every=timedelta(days=1), paused=True, loop=PlanAndExecute
    )
    try:
        listed = next(s for s in await schedules.list() if s.name == name)
        assert (listed.agent, listed.loop) == ("planner", "helpdesk.PlanAndExecute")
        await schedules.trigger(name)  # no worker serves it here: the run waits, typed
        (run,) = await wait_for(lambda: _runs(harness, f"{SCHEDULED_BY} = '{name}'"))
        assert run.workflow_type == "helpdesk.PlanAndExecute"
        await harness.client.get_workflow_handle(run.id).terminate()
    finally:
        await schedules.delete(name)
    other = f"plans-{uuid.uuid4().hex[:6]}"
    code, out, err = await keel(
        harness,
        "schedule",
        "create",
        other,
        "planner",
        "plan the day",
        "--every",
        "1d",
        "--paused",
        "--loop",
        "helpdesk.PlanAndExecute",
    )
    assert (
        out.strip()
        == f"schedule {other}: planner with helpdesk.PlanAndExecute on every 1d, overlap skip"
    ), err
    code, out, err = await keel(harness, "schedule", "list")
    line = next(x for x in out.splitlines() if x.startswith(other))
    assert f"{other} [paused] planner with helpdesk.PlanAndExecute for anyone" in line
    assert (await keel(harness, "schedule", "delete", other))[0] == 0
