"""The tools of `keel mcp`. Each finds its caller (the stdio server's one person, or the
user of the request's token), then acts through the functions `keel serve` answers with, so
it refuses, and lets through, exactly what they do; nothing is decided here."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ParamSpec, TypeVar

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field
from temporalio.contrib.workflow_streams import WorkflowStreamClient

from keel.activities.registry import Agent
from keel.client.mcp_views import (
    Agents,
    Started,
    Waited,
    agent_info,
    agents_text,
    message_text,
    pending_text,
    receipt_text,
    reply,
    result_text,
    run_text,
    runs_text,
    transcript_text,
)
from keel.gateway import approvals, runs
from keel.gateway.auth import Caller
from keel.gateway.context import Gateway, RunRef
from keel.gateway.problems import from_error
from keel.workflows.authz import start_refusal
from keel.workflows.events import EventKind
from keel.workflows.models import (
    TERMINAL_STATUSES,
    AgentResult,
    AgentStatus,
    DecideReceipt,
    Decision,
    MessagePolicy,
    MessageReceipt,
    TranscriptSlice,
)

log = logging.getLogger("keel.mcp")
P = ParamSpec("P")
R = TypeVar("R")
WAIT_MAX_SECONDS = 300.0  # one call of wait_for_run; a client calls again to wait longer
RESULT_SECONDS = 30.0  # reading the answer of a run that has one
SETTLED = TERMINAL_STATUSES | {AgentStatus.IDLE, AgentStatus.WAITING_APPROVAL}

RunId = Annotated[str, Field(min_length=1, max_length=200, description="the run's id")]
CallId = Annotated[
    str, Field(min_length=1, max_length=200, description="the pending call's id (call_id)")
]


def refusals(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Every refusal as a tool error with Keel's own reason (the words the CLI and the HTTP
    API give); an unexpected error is logged, and the client gets no traceback."""

    @functools.wraps(fn)
    async def tool(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except TimeoutError as e:
            raise ToolError(str(e) or "no answer in time") from None
        except Exception as e:
            problem = from_error(e)
            if problem is None:
                log.exception("tool %s failed", fn.__name__)
                raise ToolError(f"{fn.__name__} failed: keel mcp's log has the details") from None
            raise ToolError(problem.detail) from None

    return tool


class KeelTools:
    """The tools: each finds its caller, then acts through the gateway's functions."""

    def __init__(self, gw: Gateway, agents: list[Agent] | None, user: str | None) -> None:
        self.gw = gw
        self.agents = agents  # what list_agents describes (KEEL_AGENTS), if known
        self.user = user  # stdio: the one person; None: each request's token says

    def caller(self) -> Caller:
        if self.user is not None:
            return Caller.of(self.user, "local", self.gw.policy)
        token = get_access_token()
        if token is None or not token.subject:  # the SDK's auth refuses such requests first
            raise ToolError("not signed in: send `Authorization: Bearer <token>`")
        self.gw.limit(f"user:{token.subject}")
        return Caller.of(token.subject, token.client_id, self.gw.policy)

    async def visible(self, run_id: str) -> tuple[Caller, RunRef]:
        who = self.caller()
        return who, await self.gw.run(who, run_id)

    @refusals
    async def list_agents(self) -> Annotated[CallToolResult, Agents]:
        """The agents you may start, with their tools and which calls need an approval."""
        who = self.caller()
        policy = self.gw.policy
        if self.agents is not None:
            found = [agent_info(a, policy) for a in self.agents]
            note = ""
        else:
            names = sorted(
                {n for r in (policy.roles if policy else {}).values() for n in r.agents}
                | set(policy.agents if policy else {})
            )
            found = [agent_info(Agent(name=n, instructions=""), policy) for n in names if n != "*"]
            note = (
                "only names are known here: serve with KEEL_AGENTS (or --agents) to describe them"
            )
        mine = [a for a in found if not start_refusal(policy, a.name, who.user)]
        out = Agents(agents=mine, note=note)
        return reply(out, agents_text(out))

    @refusals
    async def start_run(
        self,
        agent: Annotated[str, Field(min_length=1, max_length=200, description="the agent")],
        message: Annotated[str, Field(min_length=1, max_length=100_000)],
    ) -> Annotated[CallToolResult, Started]:
        """Start a run of an agent on a first message, as you; returns its run id."""
        who = self.caller()
        started = await runs.start_run(runs.StartRun(agent=agent, message=message), who, self.gw)
        note = ""
        if not await self.gw.agents(who).worker_arrives():
            note = (
                f"no worker polls task queue {self.gw.settings.task_queue!r} now: the run "
                "waits until one does"
            )
        out = Started(run_id=started.run_id, agent=agent, user=who.user, note=note)
        return reply(out, f"started run {out.run_id} of {agent} as {who.user}. {note}".strip())

    @refusals
    async def list_runs(
        self,
        status: AgentStatus | None = None,
        agent: Annotated[str | None, Field(max_length=200)] = None,
        limit: Annotated[int, Field(ge=1, le=500)] = 20,
    ) -> Annotated[CallToolResult, runs.Runs]:
        """Recent runs you may see, newest first (optionally of one status or agent)."""
        out = await runs.list_runs(self.caller(), self.gw, status, agent, limit)
        return reply(out, runs_text(out.runs))

    @refusals
    async def run_status(self, run_id: RunId) -> Annotated[CallToolResult, runs.RunView]:
        """A run's status, step, usage and the calls waiting for an approval."""
        who, ref = await self.visible(run_id)
        view = await runs.get_run(ref, who, self.gw)
        return reply(view, run_text(view))

    @refusals
    async def run_transcript(
        self, run_id: RunId, start: Annotated[int, Field(ge=0)] = 0
    ) -> Annotated[CallToolResult, TranscriptSlice]:
        """A page of the run's conversation from message `start`; the last page has the
        final answer."""
        who, ref = await self.visible(run_id)
        page = await runs.get_transcript(ref, who, self.gw, start)
        return reply(page, transcript_text(page))

    @refusals
    async def run_result(self, run_id: RunId) -> Annotated[CallToolResult, AgentResult]:
        """The run's answer: once it has ended, or (an agent that keeps its conversation
        open) once its turn is over. Refused while it is still working."""
        who, ref = await self.visible(run_id)
        view = await runs.get_run(ref, who, self.gw)
        if ref.running and view.status not in TERMINAL_STATUSES | {AgentStatus.IDLE}:
            status = getattr(view.status, "value", view.status)
            raise ToolError(
                f"run {run_id} has no answer yet: it is {status}; wait_for_run waits for it"
            )
        result = await self.gw.agents(who).result(run_id, timeout=RESULT_SECONDS)
        return reply(result, result_text(run_id, result))

    @refusals
    async def wait_for_run(
        self,
        run_id: RunId,
        timeout_seconds: Annotated[float, Field(ge=0, le=WAIT_MAX_SECONDS)] = 60.0,
    ) -> Annotated[CallToolResult, Waited]:
        """Wait (at most timeout_seconds) until the run needs an approval, has an answer, or
        has ended; `reached` says whether it did, `run` is its status then."""
        who, ref = await self.visible(run_id)
        agents = self.gw.agents(who)

        async def settled() -> runs.RunView | None:
            nonlocal ref
            ref = await self.gw.run(who, run_id)
            view = await runs.get_run(ref, who, self.gw)
            return view if not ref.running or view.status in SETTLED else None

        try:
            async with asyncio.timeout(timeout_seconds):
                view = await settled()
                if view is None:
                    # from where its events are now: what changes after the look below is
                    # in the stream past this offset, so nothing is missed
                    start = await WorkflowStreamClient.create(agents.client, run_id).get_offset()
                    view = await settled()
                if view is None:
                    kinds = (EventKind.STATUS, EventKind.APPROVAL_REQUESTED, EventKind.ENDED)
                    async for _, event in agents.events(run_id, from_offset=start):
                        if event.kind in kinds and (view := await settled()) is not None:
                            break
                    view = view or await settled()
        except TimeoutError:
            view = None
        reached = view is not None
        out = Waited(reached=reached, run=view or await runs.get_run(ref, who, self.gw))
        said = "" if reached else f"still working after {timeout_seconds:g} s: "
        return reply(out, said + run_text(out.run))

    @refusals
    async def send_message(
        self,
        run_id: RunId,
        text: Annotated[str, Field(min_length=1, max_length=200_000)],
        policy: MessagePolicy | None = None,
        message_id: Annotated[
            str | None,
            Field(min_length=1, max_length=200, description="sent again with it: taken once"),
        ] = None,
    ) -> Annotated[CallToolResult, MessageReceipt]:
        """Send the run a message as you. `policy` says what it does to a turn in flight:
        queue (next step), interrupt, rollback (drop the turn), reject (refused while busy);
        default: the agent's."""
        who, ref = await self.visible(run_id)
        body = runs.SendMessage(text=text, policy=policy, id=message_id)
        receipt = await runs.send_message(body, ref, who, self.gw)
        return reply(receipt, message_text(receipt))

    @refusals
    async def pending_approvals(self) -> Annotated[CallToolResult, approvals.Approvals]:
        """Every call waiting for an approval in the runs you may see, oldest first, with
        its arguments and its tool's JSON schema (`parameters`, for edit_call)."""
        out = await approvals.list_approvals(self.caller(), self.gw)
        return reply(out, pending_text(out.approvals))

    async def decide(self, run_id: str, call_id: str, body: approvals.Decide) -> CallToolResult:
        who, ref = await self.visible(run_id)
        receipt = await approvals.decide(body, ref, who, self.gw, call_id)
        return reply(receipt, receipt_text(receipt))

    @refusals
    async def approve_call(
        self, run_id: RunId, call_id: CallId
    ) -> Annotated[CallToolResult, DecideReceipt]:
        """Approve a pending call as you; the run refuses what its policy does not allow
        you (approver roles, four-eyes, signatures), with its reason."""
        return await self.decide(run_id, call_id, approvals.Decide(decision=Decision.APPROVE))

    @refusals
    async def reject_call(
        self,
        run_id: RunId,
        call_id: CallId,
        reason: Annotated[str, Field(min_length=1, max_length=2000)],
    ) -> Annotated[CallToolResult, DecideReceipt]:
        """Reject a pending call as you; the model sees the reason as the call's result."""
        body = approvals.Decide(decision=Decision.REJECT, reason=reason)
        return await self.decide(run_id, call_id, body)

    @refusals
    async def edit_call(
        self,
        run_id: RunId,
        call_id: CallId,
        arguments: Annotated[
            dict[str, Any], Field(description="the arguments to change; the others stay")
        ],
    ) -> Annotated[CallToolResult, DecideReceipt]:
        """Approve a pending call with changed arguments (checked against its schema)."""
        body = approvals.Decide(decision=Decision.EDIT, arguments=arguments)
        return await self.decide(run_id, call_id, body)

    @refusals
    async def cancel_run(self, run_id: RunId) -> Annotated[CallToolResult, runs.Accepted]:
        """Cancel the run: calls in flight are cancelled, its record is kept."""
        who, ref = await self.visible(run_id)
        out = await runs.cancel_run(ref, who, self.gw)
        return reply(out, f"cancel requested for {run_id}")
