"""Agents on a schedule: Temporal Schedules that start runs (`keel schedule ...`).

A schedule starts a run of an agent on a message by a cron expression or an interval. What
happens when a run is still going at the next time is the overlap policy, always explicit
(default `skip`). Each run it starts has the id `<schedule>-<time>`, the search attribute
`TemporalScheduledById` = the schedule's name (`keel list` and the Web UI filter on it), and
a static summary naming the schedule.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.service import RPCError, RPCStatusCode

from keel.client.api import KeelClientError, workflow_type
from keel.workflows.models import AGENT_NAME, WORKFLOW_TYPE, AgentInput
from keel.workflows.steps import WORKFLOW_TASK_TIMEOUT

if TYPE_CHECKING:
    from keel.client.api import AgentClient

OVERLAP = {
    "skip": ScheduleOverlapPolicy.SKIP,
    "buffer_one": ScheduleOverlapPolicy.BUFFER_ONE,
    "buffer_all": ScheduleOverlapPolicy.BUFFER_ALL,
    "cancel_other": ScheduleOverlapPolicy.CANCEL_OTHER,
    "terminate_other": ScheduleOverlapPolicy.TERMINATE_OTHER,
    "allow_all": ScheduleOverlapPolicy.ALLOW_ALL,
}
SCHEDULED_BY = "TemporalScheduledById"  # Temporal sets it on every run a schedule starts
# Temporal lists schedules from its visibility store, a moment behind a create: `create`
# returns once the new schedule is listed, or after this many seconds
LISTED_PATIENCE = 10.0
LOOK_EVERY = 0.2


class ScheduleError(KeelClientError):
    """A schedule could not be made or changed; the message says why and what to do."""


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as `keel schedule list` shows it."""

    name: str
    agent: str
    message: str
    user: str
    when: str  # the cron expressions or intervals
    overlap: str
    paused: bool
    note: str
    next_runs: list[datetime]
    recent_runs: list[str]  # the run ids it started lately
    loop: str = WORKFLOW_TYPE  # the workflow type its runs run


def parse_every(text: str) -> timedelta:
    """`90s`, `15m`, `2h`, `1d` (or a plain number of seconds) as a timedelta."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    try:
        seconds = float(raw[:-1]) * units[raw[-1]] if raw[-1:] in units else float(raw)
    except (ValueError, IndexError):
        raise ScheduleError(f"--every takes e.g. 30s, 15m, 2h or 1d, not {text!r}") from None
    if seconds < 1:
        raise ScheduleError(f"--every must be at least one second, not {text!r}")
    return timedelta(seconds=seconds)


def span(every: timedelta) -> str:
    """An interval as `--every` takes it: 1d, 2h, 15m, 90s."""
    seconds = int(every.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Schedules:
    """Create, list, pause, trigger and delete the schedules that start runs of agents."""

    def __init__(self, agents: AgentClient) -> None:
        self.agents = agents
        self.client = agents.client

    async def create(
        self,
        name: str,
        agent: str,
        message: str,
        *,
        cron: str | None = None,
        every: timedelta | None = None,
        user: str = "",
        overlap: str = "skip",
        paused: bool = False,
        note: str = "",
        loop: str | type = WORKFLOW_TYPE,
        task_queue: str | None = None,
    ) -> str:
        """A schedule that starts `agent` on `message` by `cron` (or `every`); its name.
        `loop` and `task_queue` as `AgentClient.start` takes them. It returns once the
        schedule is listed (`list`), or after LISTED_PATIENCE seconds."""
        if (cron is None) == (every is None):
            raise ScheduleError("a schedule needs exactly one of --cron and --every")
        if overlap not in OVERLAP:
            raise ScheduleError(f"overlap must be one of {', '.join(OVERLAP)}, not {overlap!r}")
        spec = (
            ScheduleSpec(cron_expressions=[cron])
            if cron is not None
            else ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)])  # type: ignore[arg-type]
        )
        options = self.agents.start_options(agent, message, user, schedule=name)
        action = ScheduleActionStartWorkflow(
            workflow_type(loop),
            AgentInput(agent=agent, message=message, user=user),
            id=name,
            task_queue=task_queue or self.agents.task_queue,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
            typed_search_attributes=options["search_attributes"],
            static_summary=options["static_summary"],
        )
        schedule = Schedule(
            action=action,
            spec=spec,
            policy=SchedulePolicy(overlap=OVERLAP[overlap]),
            state=ScheduleState(
                paused=paused, note=note or f"keel: {agent} for {user or 'anyone'}"
            ),
        )
        try:
            when = f"cron {cron}" if cron is not None else f"every {span(every)}"  # type: ignore[arg-type]
            await self.client.create_schedule(name, schedule, memo={"keel_when": when})
        except ScheduleAlreadyRunningError:
            raise ScheduleError(
                f"a schedule named {name!r} exists: delete it first (keel schedule delete {name})"
            ) from None
        except RPCError as e:
            if e.status == RPCStatusCode.INVALID_ARGUMENT:
                raise ScheduleError(f"the schedule was refused: {e.message}") from None
            raise
        await self._listed(name)
        return name

    async def _listed(self, name: str) -> bool:
        """Whether the schedule is listed now, or within LISTED_PATIENCE seconds."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + LISTED_PATIENCE
        while True:
            if any([entry.id == name async for entry in await self.client.list_schedules()]):
                return True
            if loop.time() >= give_up:
                return False
            await asyncio.sleep(LOOK_EVERY)

    async def list(self) -> list[ScheduleInfo]:
        """Every schedule that starts Keel runs (with any loop) on this task queue."""
        found = []
        async for entry in await self.client.list_schedules():
            try:
                desc = await self.client.get_schedule_handle(entry.id).describe()
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:  # deleted meanwhile
                    continue
                raise
            action = desc.schedule.action
            if not isinstance(action, ScheduleActionStartWorkflow):
                continue
            # every Keel run carries AgentName from its start, whatever its loop
            keel_run = action.typed_search_attributes.get(AGENT_NAME) is not None
            if not keel_run or action.task_queue != self.agents.task_queue:
                continue
            args = action.args
            decoded = await self.client.data_converter.decode(args, [AgentInput]) if args else []
            input = decoded[0] if decoded else AgentInput(agent="?", message="")
            spec = desc.schedule.spec
            # the server keeps a cron as calendars: the memo keeps what the user wrote
            when = (await desc.memo()).get("keel_when") or ", ".join(
                [f"cron {c}" for c in spec.cron_expressions]
                + [f"every {span(i.every)}" for i in spec.intervals]
                + [str(c) for c in spec.calendars]
            )
            state = desc.schedule.state
            overlap = desc.schedule.policy.overlap
            found.append(
                ScheduleInfo(
                    name=entry.id,
                    agent=input.agent,
                    message=input.message,
                    user=input.user,
                    when=str(when),
                    overlap=next((k for k, v in OVERLAP.items() if v == overlap), str(overlap)),
                    paused=state.paused,
                    note=state.note or "",
                    next_runs=list(desc.info.next_action_times[:3]),
                    recent_runs=[
                        a.action.workflow_id
                        for a in desc.info.recent_actions
                        if hasattr(a.action, "workflow_id")
                    ],
                    loop=action.workflow,
                )
            )
        return found

    async def pause(self, name: str, note: str = "") -> None:
        await self._call(name, "pause", note=note or "paused with keel")

    async def unpause(self, name: str, note: str = "") -> None:
        await self._call(name, "unpause", note=note or "unpaused with keel")

    async def trigger(self, name: str) -> None:
        """Start a run now (the overlap policy applies)."""
        await self._call(name, "trigger")

    async def delete(self, name: str) -> None:
        """Delete the schedule; runs it started go on."""
        await self._call(name, "delete")

    async def _call(self, name: str, what: str, **kwargs: str) -> None:
        handle = self.client.get_schedule_handle(name)
        try:
            await getattr(handle, what)(**kwargs)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ScheduleError(f"no schedule named {name!r} (keel schedule list)") from None
            raise
