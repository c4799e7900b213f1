"""`keel mcp`: Keel's runs as an MCP server, for the MCP clients people already use.

Every tool acts as one policy user through the functions `keel serve` answers with (and so
through AgentClient), and decides nothing itself: who may start which agent, whose runs a
user sees (any other run is "not found", as a run that does not exist), and whether a
decision stands (roles, tenancy, four-eyes, signatures) are the same rules, applied by the
same code and by the run itself.

Over stdio the user is the person who started the server (`--user`, KEEL_USER) and decisions
are signed with their key (KEEL_APPROVER_KEY), as `keel approve` signs them. Over streamable
HTTP each request carries a bearer token from the tokens file `keel serve` reads
(KEEL_API_TOKENS); its user is the caller, and decisions are signed with that user's key in
KEEL_API_SIGNING_KEYS, as the HTTP API signs them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ParamSpec, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field, ValidationError
from temporalio.contrib.workflow_streams import WorkflowStreamClient

from keel.activities.registry import Agent
from keel.client.api import load_approver_key
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
from keel.config import Settings, SettingsError
from keel.gateway import approvals, runs
from keel.gateway.auth import Caller, TokenFile, token_hash
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
    Policy,
    TranscriptSlice,
)

log = logging.getLogger("keel.mcp")
P = ParamSpec("P")
R = TypeVar("R")
WAIT_MAX_SECONDS = 300.0  # one call of wait_for_run; a client calls again to wait longer
RESULT_SECONDS = 30.0  # reading the answer of a run that has one
SETTLED = TERMINAL_STATUSES | {AgentStatus.IDLE, AgentStatus.WAITING_APPROVAL}
READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
ACT = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
ENDS = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
INSTRUCTIONS = (
    "Keel runs AI agents durably. Start a run (start_run), wait until it answers or needs an "
    "approval (wait_for_run), read the pending calls with their arguments and JSON schema "
    "(pending_approvals), then approve_call, reject_call (the model sees the reason) or "
    "edit_call; read the answer with run_result. You act as one user of Keel's policy: you "
    "see only the runs it lets that user see."
)

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


class KeelServer(MCPServer):
    """MCPServer whose tool errors read as Keel's refusals: the reason alone, and for bad
    arguments each field and what is wrong with it (not the SDK's wrapping of them)."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            cause = e.__cause__
            if isinstance(cause, ValidationError):
                fields = "; ".join(
                    f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                    for err in cause.errors()[:5]
                )
                raise ToolError(f"invalid arguments for {name}: {fields}") from cause
            if type(cause) is ToolError:  # a refusal of ours: its words as they are
                raise ToolError(str(cause)) from cause
            raise


class LocalGateway(Gateway):
    """The gateway as one person's: their own signing key, as `keel approve` uses it."""

    def __init__(self, settings: Settings, policy: Policy | None, client: Any, user: str) -> None:
        super().__init__(settings, policy, None, client)
        self.user = user
        self.key_file = settings.approver_key

    def signing_key(self, user: str) -> Ed25519PrivateKey | None:
        if user != self.user or not self.key_file:
            return None
        return load_approver_key(self.key_file, f"KEEL_APPROVER_KEY={self.key_file}")


class TokenFileVerifier:
    """The MCP SDK's token verifier over Keel's tokens file: the token's user is its
    subject, the file's name of the token its client (the file is read again when it
    changes, so a revoked token is refused at its next request)."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            found = self.tokens.lookup(token)
        except SettingsError as e:
            log.error("%s", e)
            return None
        if found is None:
            return None
        name, user = found
        return AccessToken(token=token_hash(token), client_id=name, scopes=[], subject=user)


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


def build_server(tools: KeelTools, auth: AuthSettings | None = None) -> MCPServer:
    """The MCP server of these tools (with `auth`: bearer tokens from the gateway's file)."""
    verifier = TokenFileVerifier(tools.gw.tokens) if auth and tools.gw.tokens else None
    server = KeelServer(
        "keel", instructions=INSTRUCTIONS, auth=auth, token_verifier=verifier, log_level="WARNING"
    )
    for fn, hints in (
        (tools.list_agents, READ),
        (tools.start_run, ACT),
        (tools.list_runs, READ),
        (tools.run_status, READ),
        (tools.run_transcript, READ),
        (tools.run_result, READ),
        (tools.wait_for_run, READ),
        (tools.send_message, ACT),
        (tools.pending_approvals, READ),
        (tools.approve_call, ACT),
        (tools.reject_call, ENDS),
        (tools.edit_call, ACT),
        (tools.cancel_run, ENDS),
    ):
        server.add_tool(fn, annotations=hints)
    return server


def local_server(
    settings: Settings, policy: Policy | None, client: Any, user: str, agents: list[Agent] | None
) -> MCPServer:
    """The server one person runs over stdio, acting as `user`."""
    gw = LocalGateway(settings, policy, client, user)
    return build_server(KeelTools(gw, agents, user))


def http_server(
    settings: Settings,
    policy: Policy | None,
    client: Any,
    base_url: str,
    agents: list[Agent] | None,
) -> MCPServer:
    """The server many people reach over streamable HTTP, each with a token of the file."""
    if not settings.api_tokens:
        raise SettingsError(
            "keel mcp --http needs KEEL_API_TOKENS: a file of token hashes "
            "(`keel token new --user NAME` prints a token and its entry)"
        )
    gw = Gateway(settings, policy, TokenFile(settings.api_tokens), client)
    # no OAuth server: tokens come from the file, so no metadata is published (the issuer
    # is only a required field); a request without a valid token is answered 401
    auth = AuthSettings(issuer_url=base_url, resource_server_url=None)  # type: ignore[arg-type]
    return build_server(KeelTools(gw, agents, None), auth)
