"""/api/runs: start, list, read, follow, message, cancel and resume runs, as the caller.

Each route reads the run once (`describe`, no worker needed) and answers 404 unless the caller
may see it; an act on a run that has ended is refused (409) before anything is sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse
from temporalio.service import RPCError, RPCStatusCode

from keel.client.api import NoWorker, RunSummary
from keel.gateway.auth import Caller
from keel.gateway.context import Gateway, RunRef, caller, gateway, visible_run
from keel.gateway.problems import Problem, documented, not_found, refusal
from keel.gateway.streams import agui_events, caller_runs, run_events, sse
from keel.workflows.models import (
    WORKFLOW_TYPE,
    AgentStatus,
    ApprovalRequest,
    MessagePolicy,
    MessageReceipt,
    RunState,
    TranscriptSlice,
    Usage,
)

router = APIRouter(prefix="/api")
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "SSE"}
}


class StartRun(BaseModel):
    agent: str = Field(min_length=1, max_length=200)
    message: str = Field(max_length=100_000)
    run_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=RUN_ID)
    loop: str | None = Field(default=None, min_length=1, max_length=200)  # a workflow type


class Started(BaseModel):
    run_id: str


class Runs(BaseModel):
    runs: list[RunSummary]


class RunView(BaseModel):
    """A run's status: what Temporal knows of it and what its status query says."""

    run_id: str
    agent: str
    user: str
    status: AgentStatus | str
    step: int = 0
    usage: Usage = Field(default_factory=Usage)
    pending_approvals: list[ApprovalRequest] = Field(default_factory=list)
    error: str | None = None
    keeps_open: bool | None = None
    temporal_status: str = ""
    task_queue: str = ""
    started: datetime | None = None


class SendMessage(BaseModel):
    text: str = Field(min_length=1, max_length=200_000)
    policy: MessagePolicy | None = None
    id: str | None = Field(default=None, min_length=1, max_length=200)


class Accepted(BaseModel):
    run_id: str
    detail: str


Visible = Annotated[RunRef, Depends(visible_run)]
Who = Annotated[Caller, Depends(caller)]
Gw = Annotated[Gateway, Depends(gateway)]


@router.post("/runs", status_code=201, response_model=Started, responses=documented(403, 409))
async def start_run(body: StartRun, who: Who, gw: Gw) -> Started:
    """Start a run of an agent, as the caller (AgentClient.start)."""
    agents = gw.agents(who)
    if body.run_id is not None:
        # a chosen id must be new: reusing one (Temporal allows it for a closed run) would put
        # the caller's run in front of another person's under the same id
        try:
            await agents.client.get_workflow_handle(body.run_id).describe()
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
        else:
            raise Problem(409, f"run id {body.run_id} is taken: choose another, or leave it out")
    run_id = await agents.start(
        body.agent, body.message, run_id=body.run_id, loop=body.loop or WORKFLOW_TYPE
    )
    return Started(run_id=run_id)


@router.get("/runs", response_model=Runs, responses=documented())
async def list_runs(
    who: Who,
    gw: Gw,
    status: AgentStatus | None = None,
    agent: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Runs:
    """Recent runs the caller may see, newest first."""
    runs = await gw.agents(who).list(
        status=status.value if status else None, limit=limit, agent=agent or None
    )
    return Runs(runs=runs)


@router.get("/runs/{run_id}", response_model=RunView, responses=documented(404))
async def get_run(run: Visible, who: Who, gw: Gw) -> RunView:
    """The run's status, step, usage and open approvals. A run that has ended is described
    from Temporal's record when no worker can be asked."""
    agents = gw.agents(who)
    try:
        await gw.served(run)
        view = await agents.status(run.run_id)
    except NoWorker:
        if run.running:
            raise
        s = await agents.summary(run.run_id)
        return RunView(
            run_id=run.run_id,
            agent=run.agent,
            user=run.user,
            status=s.status or s.temporal_status,
            step=s.steps,
            usage=Usage(total_tokens=s.tokens),
            error=s.error or None,
            temporal_status=run.temporal_status,
            task_queue=run.task_queue,
            started=run.started,
        )
    return RunView(
        run_id=run.run_id,
        agent=run.agent,
        user=run.user,
        temporal_status=run.temporal_status,
        task_queue=run.task_queue,
        started=run.started,
        **view.model_dump(),
    )


@router.get("/runs/{run_id}/state", response_model=RunState, responses=documented(404))
async def get_state(run: Visible, who: Who, gw: Gw) -> RunState:
    """The run's whole state (keel.RunState): transcript, approvals, effects, audit."""
    await gw.served(run)
    return await gw.agents(who).get_state(run.run_id)


@router.get("/runs/{run_id}/transcript", response_model=TranscriptSlice, responses=documented(404))
async def get_transcript(
    run: Visible, who: Who, gw: Gw, start: Annotated[int, Query(ge=0)] = 0
) -> TranscriptSlice:
    """A page of the run's transcript from message `start`."""
    await gw.served(run)
    return await gw.agents(who).transcript(run.run_id, start)


def _resume_from(last_event_id: str | None, from_: int | None) -> int:
    if last_event_id is not None:
        try:
            last = int(last_event_id)
        except ValueError:
            raise Problem(
                422, f"Last-Event-ID must be an event's offset, not {last_event_id!r}"
            ) from None
        if last < -1:
            raise Problem(422, "Last-Event-ID must not be below -1")
        return last + 1
    return from_ or 0


async def _streamable(run: RunRef, gw: Gateway) -> None:
    """An ended run's events are read by query, which needs a worker (a live run's stream
    waits for one)."""
    if not run.running:
        await gw.served(run)


@router.get("/runs/{run_id}/events", responses={**documented(404), **SSE_DOC})
async def follow_run(
    request: Request,
    run: Visible,
    who: Who,
    gw: Gw,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
    from_: Annotated[int | None, Query(alias="from", ge=0)] = None,
) -> EventSourceResponse:
    """The run's events as Server-Sent Events (`id` = offset, `event` = kind, `data` =
    RunEvent JSON), after `Last-Event-ID` or from `?from=`, until the run ends."""
    start = _resume_from(last_event_id, from_)
    await _streamable(run, gw)
    events = gw.feeds.follow(gw.agents(who), run.run_id, start)
    return sse(run_events(events, request.url.path))


@router.get("/runs/{run_id}/agui", responses={**documented(404), **SSE_DOC})
async def follow_run_agui(
    request: Request,
    run: Visible,
    who: Who,
    gw: Gw,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
    from_: Annotated[int | None, Query(alias="from", ge=0)] = None,
) -> EventSourceResponse:
    """The run's events as AG-UI events (Server-Sent Events)."""
    start = _resume_from(last_event_id, from_)
    await _streamable(run, gw)
    events = gw.feeds.follow(gw.agents(who), run.run_id, start)
    return sse(agui_events(events, run.run_id, request.url.path))


@router.get("/events", responses={**documented(), **SSE_DOC})
async def follow_runs(
    request: Request, who: Who, gw: Gw, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> EventSourceResponse:
    """The caller's runs as they change (`event: run`, a RunSummary) and the count of their
    open approvals (`event: approvals`, `{"count": n}`)."""
    return sse(caller_runs(gw.agents(who), limit, request.url.path))


@router.post(
    "/runs/{run_id}/messages", response_model=MessageReceipt, responses=documented(404, 409)
)
async def send_message(body: SendMessage, run: Visible, who: Who, gw: Gw) -> MessageReceipt:
    """Send the run a message as the caller; a refusal is a 409 with the run's reason."""
    if not run.running:
        raise run.ended("it takes no more messages")
    receipt = await gw.agents(who).send_message(
        run.run_id, body.text, body.policy, sender=who.user, message_id=body.id
    )
    if receipt.status == "rejected":
        raise refusal(receipt.reason)
    return receipt


@router.post(
    "/runs/{run_id}/cancel",
    status_code=202,
    response_model=Accepted,
    responses=documented(404, 409),
)
async def cancel_run(run: Visible, who: Who, gw: Gw) -> Accepted:
    """Ask the run to cancel (in-flight calls are cancelled, its record is kept)."""
    if not run.running:
        raise run.ended("there is nothing to cancel")
    try:
        await gw.agents(who).cancel(run.run_id)
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise not_found(run.run_id) from None
        raise
    return Accepted(run_id=run.run_id, detail="cancel requested")


@router.post(
    "/runs/{run_id}/resume",
    status_code=202,
    response_model=Accepted,
    responses=documented(404, 409),
)
async def resume_run(run: Visible, who: Who, gw: Gw) -> Accepted:
    """Ask a run waiting on its model provider to try again now."""
    if not run.running:
        raise run.ended("there is nothing to resume")
    await gw.agents(who).resume(run.run_id)
    return Accepted(run_id=run.run_id, detail="asked to try its model provider again now")
