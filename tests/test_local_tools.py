"""Read-only tools as local activities (`@tool(local=True)`): one workflow task per step."""

from __future__ import annotations

import json

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.workflows.models import RUN_TOOL, AgentStatus, ApprovalMode, ApprovalPolicy
from tests.agents import INSTRUCTIONS, AddArgs, WaitArgs, add
from tests.conftest import Harness


@tool(name="add", local=True)
async def add_here(args: AddArgs, ctx: ToolContext) -> str:
    """Add two integers (in the workflow's own task)."""
    ctx.heartbeat()  # harmless in a local activity
    return json.dumps({"result": args.a + args.b, "local": activity.info().is_local})


@tool(name="flaky", local=True, initial_retry_seconds=0.1)
async def flaky_here(args: WaitArgs, ctx: ToolContext) -> str:
    """Fails on its first two attempts, then works."""
    if activity.info().attempt < 3:
        raise RuntimeError(f"transient failure on attempt {activity.info().attempt}")
    return json.dumps({"result": activity.info().attempt})


LOCAL = Agent(name="local", instructions=INSTRUCTIONS, tools=[add_here, flaky_here])
REMOTE = Agent(name="remote", instructions=INSTRUCTIONS, tools=[add])


def _events(history: object, kind: int) -> list:  # type: ignore[type-arg]
    return [e for e in history.events if e.event_type == kind]  # type: ignore[attr-defined]


def _tasks_after_first_step(history: object) -> int:
    """Workflow tasks completed once the first model call was scheduled (the first task's
    own count varies: the spec's local activity may take a task of its own)."""
    events = history.events  # type: ignore[attr-defined]
    first = next(
        i
        for i, e in enumerate(events)
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )
    return sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED for e in events[first:])


def _tool_marker_in_the_replys_task(history: object) -> bool:
    """The local tool's marker is among the commands of the task after the first model call
    completed (between that task's completion and the next task)."""
    events = history.events  # type: ignore[attr-defined]
    done = next(
        i
        for i, e in enumerate(events)
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    )
    completed = next(
        i
        for i in range(done, len(events))
        if events[i].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    for e in events[completed + 1 :]:
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            return False
        a = e.marker_recorded_event_attributes
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED and RUN_TOOL.encode() in (
            a.details["data"].payloads[0].data if "data" in a.details else b""
        ):
            return True
    return False


async def test_a_local_tool_runs_in_the_workflow_task(harness: Harness) -> None:
    async with harness.running([LOCAL]):
        run = await harness.start("local", "add 2 and 3")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
        history = await harness.client.get_workflow_handle(run).fetch_history()
    async with harness.running([REMOTE]):  # the same conversation, the tool an activity
        other = await harness.start("remote", "add 2 and 3")
        await harness.agents.result(other, timeout=30)
        baseline = await harness.client.get_workflow_handle(other).fetch_history()
    assert result.status == AgentStatus.COMPLETED
    tool_msg = next(m for m in state.transcript if m.role == "tool")
    assert json.loads(tool_msg.content) == {"result": 5, "local": True}
    # no activity task for the tool: its result is a marker in the model step's task
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in _events(history, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    ]
    assert RUN_TOOL not in scheduled and scheduled.count("keel.call_model") == 2
    assert len(_events(history, EventType.EVENT_TYPE_MARKER_RECORDED)) >= 2  # spec + tool
    # the tool ran in the task that took the model's reply: its result is a marker of the
    # first task after the first model call, not an activity of a task of its own. (Counting
    # all tasks would count a task the worker completes early to keep a slow one alive.)
    names = [EventType.Name(e.event_type)[11:] for e in history.events]
    assert _tool_marker_in_the_replys_task(history), " ".join(names)
    assert _tasks_after_first_step(baseline) == 3


async def test_a_local_tool_retries_in_the_worker(harness: Harness) -> None:
    async with harness.running([LOCAL]):
        run = await harness.start("local", "try the flaky tool")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    tool_msg = next(m for m in state.transcript if m.role == "tool")
    assert json.loads(tool_msg.content) == {"result": 3}


def test_local_is_for_read_only_tools() -> None:
    with pytest.raises(ValueError, match="read-only"):

        @tool(local=True, side_effects=True)
        async def refund(args: AddArgs, ctx: ToolContext) -> str:
            return ""

    with pytest.raises(ValueError, match="approval"):

        @tool(local=True, approval=ApprovalPolicy(mode=ApprovalMode.ALWAYS))
        async def peek(args: AddArgs, ctx: ToolContext) -> str:
            return ""

    with pytest.raises(ValueError, match="approval"):
        Agent(
            name="gated",
            instructions=INSTRUCTIONS,
            tools=[add_here],
            approvals={"add": ApprovalPolicy(mode=ApprovalMode.ALWAYS)},
        )
