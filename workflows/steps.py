"""Building blocks any agent loop composes: load the spec, the model step, the tool step, the
sub-agent step, status publication. Each activity call names its timeouts, retry policy and
summary here. Activities are scheduled by name: workflow code never imports `activities`."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
)

from keel.workflows import errors
from keel.workflows.authz import allowed_tools, tenant_of
from keel.workflows.budgets import budget_left, limits_of, priced, roll_up, usage_line
from keel.workflows.compaction import request_messages
from keel.workflows.models import (
    AGENT_NAME,
    AGENT_STATUS,
    AGENT_STEPS,
    AGENT_TENANT,
    AGENT_USER,
    CALL_MODEL,
    LOAD_AGENT_SPEC,
    MCP_LIST_TOOLS,
    PENDING_APPROVALS,
    RUN_TOOL,
    TOTAL_TOKENS,
    WORKFLOW_TYPE,
    AgentInput,
    AgentResult,
    AgentSpec,
    AgentState,
    AgentStatus,
    LoadAgentInput,
    MCPListInput,
    MCPToolList,
    ModelInput,
    ModelResult,
    ModelSettings,
    SubAgentArgs,
    ToolCall,
    ToolInput,
    ToolResult,
    ToolSpec,
    Usage,
)
from keel.workflows.policy import short_args
from keel.workflows.transcript_ref import TranscriptChain
from keel.workflows.views import MAX_CONTEXT_CHARS, context_window

LOAD_SPEC_TIMEOUT = timedelta(seconds=10)
# How fast a dead worker's calls are taken over: an activity heartbeats at once and then
# every 0.5 s (activities/heartbeat.py, paced by the plugin's heartbeat throttle), so a
# 2.5 s heartbeat timeout notices a SIGKILLed worker within 2.5 s and leaves a live call
# 2 s of slack on a busy worker (2 s left a starved worker's live calls timed out: see
# docs/chaos.md); the retry then starts after half a second.
MODEL_HEARTBEAT_TIMEOUT = timedelta(seconds=2.5)
MODEL_RETRY_INITIAL = timedelta(seconds=0.5)
MODEL_RETRY_MAX_INTERVAL = timedelta(seconds=30)
TOOL_RETRY_MAX_INTERVAL = timedelta(seconds=60)
TOOL_HEARTBEAT_SECONDS = 2.5
# A workflow task a dead worker had started is given to another after this (Temporal's
# default is 10 s). Keel's tasks take milliseconds; the longest is a cold replay of a history
# up to the continue-as-new point, which stays well inside it.
WORKFLOW_TASK_TIMEOUT = timedelta(seconds=4)
MAX_PAYLOAD_BYTES = 1_800_000
NON_RETRYABLE_PROVIDER = [
    errors.PROVIDER_REJECTED,
    errors.PROVIDER_AUTH,
    errors.MODEL_UNAVAILABLE,
    errors.CONTEXT_TOO_LONG,
    errors.PAYLOAD_TOO_LARGE,
    errors.KEEL_INTERNAL,
]
AUTH_RETRY_SECONDS = 300.0  # a key to fix: try again this often, or at once on `keel resume`
# runs recorded before it neither bounded a sub-agent's budget nor counted its usage
SHARED_BUDGET_PATCH = "keel-shared-budget"
MCP_LIST_TIMEOUT = timedelta(seconds=60)
# a server that is down when a run starts: tried for about ten minutes before the run fails
MCP_LIST_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=25,
    non_retryable_error_types=["MCPToolsetError"],
)
MCP_UNLISTED = "MCPServerUnlisted"  # the run could not list an MCP server of its agent


class TaskClock:
    """The time budgets read. A local activity's result arrives, live, in an activation of its
    own with a later clock than on replay (where it comes with its task): after one, until
    the next task begins, budgets read the time the task began, the same both ways."""

    def __init__(self) -> None:
        self._began: datetime | None = None

    def hold(self) -> None:
        """A local activity runs in this task: keep reading the task's start until `release`."""
        if self._began is None:
            self._began = workflow.now()

    def release(self) -> None:
        """A new task began (a regular activity's result came with it)."""
        self._began = None

    def now(self) -> datetime:
        return self._began or workflow.now()


def payload_bytes(value: BaseModel) -> int:
    """The size of `value` as Temporal will see it (encoded bytes, not characters)."""
    return workflow.payload_converter().to_payloads([value])[0].ByteSize()


def _root_cause(e: BaseException) -> BaseException:
    while isinstance(e, ActivityError | ChildWorkflowError) and e.cause is not None:
        e = e.cause
    return e


def failure_message(e: BaseException) -> str:
    """The innermost cause's message: what the provider or the tool actually said."""
    root = _root_cause(e)
    return str(root) or type(root).__name__


def failure_retry_after(e: BaseException) -> float:
    """The delay the provider asked for (Retry-After), in seconds; 0 when it asked none."""
    root = _root_cause(e)
    delay = root.next_retry_delay if isinstance(root, ApplicationError) else None
    return delay.total_seconds() if delay else 0.0


def failure_type(e: BaseException) -> str:
    """The ApplicationError type behind an activity failure, if any."""
    root = _root_cause(e)
    return root.type or "" if isinstance(root, ApplicationError) else ""


async def load_spec(agent: str) -> AgentSpec:
    """The agent's spec from the worker's registry, recorded in history as this run's snapshot."""
    try:
        return await workflow.execute_local_activity(
            LOAD_AGENT_SPEC,
            LoadAgentInput(agent=agent),
            result_type=AgentSpec,
            start_to_close_timeout=LOAD_SPEC_TIMEOUT,
            retry_policy=RetryPolicy(maximum_attempts=3),
            summary=f"load agent {agent}",
        )
    except (ActivityError, ApplicationError) as e:
        # a local activity's failure can arrive bare, as the activity's own ApplicationError
        if isinstance(e.cause, CancelledError):
            raise
        raise errors.KeelError(failure_message(e), type=errors.AGENT_NOT_FOUND) from e


async def pin_mcp_tools(spec: AgentSpec) -> AgentSpec:
    """The spec with its MCP servers' tools pinned: each server listed once, in an activity
    (recorded, so replay and continue-as-new never ask the server again), its tools added to
    the spec's (those the run's policy allows) and its digest recorded."""
    tools, pins = list(spec.tools), []
    for pin in spec.mcp:
        try:
            listed: MCPToolList = await workflow.execute_activity(
                MCP_LIST_TOOLS,
                MCPListInput(agent=spec.name, server=pin.server),
                task_queue=spec.tool_task_queue or None,
                result_type=MCPToolList,
                start_to_close_timeout=MCP_LIST_TIMEOUT,
                retry_policy=MCP_LIST_RETRY,
                summary=f"mcp list {pin.server}",
            )
        except ActivityError as e:
            if isinstance(e.cause, CancelledError):
                raise
            raise errors.KeelError(
                f"cannot list the tools of MCP server {pin.server!r}: {failure_message(e)}",
                type=MCP_UNLISTED,
            ) from e
        tools.extend(allowed_tools(spec.policy, spec.name, listed.tools))
        pins.append(
            pin.model_copy(
                update={"digest": listed.digest, "tools": [t.name for t in listed.tools]}
            )
        )
    return spec.model_copy(update={"tools": tools, "mcp": pins})


async def model_step(
    spec: AgentSpec,
    state: AgentState,
    tools: list[ToolSpec] | None = None,
    settings: ModelSettings | None = None,
    stream_id: str = "",
    chain: TranscriptChain | None = None,
) -> ModelResult:
    """Call the model on the run's transcript, offering `tools` (default: all the agent's;
    `[]`: the agent's are listed, as the transcript may mention them, but none may be called).
    Raises ActivityError when the provider fails, KeelError when the request would not fit
    in a Temporal payload. `settings` picks a model of the agent's chain (default: its own).
    With `stream_id`, the activity sends the reply as it is written (`keel.model_stream`).
    With `chain` (payload storage on), the context goes by reference to what the worker
    stored (keel.workflows.transcript_ref)."""
    s = settings or spec.model
    # a compacted conversation: its latest summary in place of the messages it covers
    told = request_messages(state.transcript) if spec.compaction else state.transcript
    window = context_window(told, MAX_CONTEXT_CHARS)
    left_out: set[str] = set()
    if window is not state.transcript:  # older turns are left out of (or summarised in) it
        shown = {c.id for m in window for c in m.tool_calls}
        left_out = {c.id for m in state.transcript for c in m.tool_calls} - shown
    request = ModelInput(
        agent=spec.name,
        step=state.step,
        settings=s,
        messages=window,
        tools=spec.tools if not tools else tools,
        tool_choice="none" if tools == [] else "",
        reserved_call_ids=sorted({*state.used_call_ids(), *left_out}),
        stream_id=stream_id if s.stream else "",
    )
    if chain is not None:
        request = chain.refer(request)
    size = 0 if spec.payload_storage else payload_bytes(request)  # stored: a reference
    if size > MAX_PAYLOAD_BYTES:
        raise errors.KeelError(
            f"the model request for step {state.step} is {size} bytes, over Keel's "
            f"{MAX_PAYLOAD_BYTES}-byte limit (Temporal refuses payloads past 2 MB)",
            type=errors.PAYLOAD_TOO_LARGE,
        )
    result = await workflow.execute_activity(
        CALL_MODEL,
        request,
        task_queue=spec.model_task_queue or None,
        result_type=ModelResult,
        start_to_close_timeout=timedelta(seconds=s.timeout_seconds + 5),
        heartbeat_timeout=MODEL_HEARTBEAT_TIMEOUT,
        retry_policy=RetryPolicy(
            initial_interval=MODEL_RETRY_INITIAL,
            maximum_interval=MODEL_RETRY_MAX_INTERVAL,
            maximum_attempts=s.max_attempts,
            non_retryable_error_types=NON_RETRYABLE_PROVIDER,
        ),
        summary=f"model {s.model or 'default'} · step {state.step}",
    )
    result.usage = priced(result.usage, limits_of(spec, state).prices, s.model, result.model)
    return result


async def tool_step(
    spec: AgentSpec, state: AgentState, call: ToolCall, t: ToolSpec, key: str
) -> ToolResult:
    """Run one tool call with that tool's own timeouts and retries; failures become results."""
    input = ToolInput(
        agent=spec.name,
        tool=call.name,
        arguments=call.arguments,
        call_id=call.id,
        idempotency_key=key,
        run_id=workflow.info().workflow_id,
        user=state.user,
        mcp_server=t.mcp_server,
        mcp_tool=t.mcp_tool,
    )
    retry = RetryPolicy(
        initial_interval=timedelta(seconds=t.initial_retry_seconds),
        maximum_interval=TOOL_RETRY_MAX_INTERVAL,
        maximum_attempts=t.max_attempts,
    )
    timeout = timedelta(seconds=t.start_to_close_seconds)
    summary = f"tool {call.name}({short_args(call.arguments)})"
    try:
        if t.local:  # read-only, in this workflow task (see `tool(local=True)`)
            return await workflow.execute_local_activity(
                RUN_TOOL,
                input,
                result_type=ToolResult,
                start_to_close_timeout=timeout,
                retry_policy=retry,
                summary=summary,
            )
        # Keel heartbeats for every tool (it awaits the tool beside a heartbeat loop), so a
        # worker's death is noticed within seconds, not after the tool's whole timeout
        return await workflow.execute_activity(
            RUN_TOOL,
            input,
            task_queue=spec.tool_task_queue or None,
            result_type=ToolResult,
            start_to_close_timeout=timeout,
            heartbeat_timeout=timedelta(seconds=t.heartbeat_seconds or TOOL_HEARTBEAT_SECONDS),
            retry_policy=retry,
            summary=summary,
        )
    except ActivityError as e:
        if isinstance(e.cause, CancelledError):
            raise  # interrupted or cancelled: the caller gives the call its result
        return ToolResult(
            ok=False,
            error_type="tool_failed",
            content=f"Error: tool {call.name} failed: {failure_message(e)}",
        )


def subagent_run_id(agent: str, run_key: str, step: int, index: int) -> str:
    """The child run of the index-th call of a step: derived from the call's place in the
    run, as its idempotency key is, so a call starts its child once, and runs that reuse a
    workflow id never meet each other's children."""
    return f"{workflow.info().workflow_id}.{agent}-{run_key[:8]}-{step}-{index}"


async def subagent_step(
    spec: AgentSpec, state: AgentState, tool: ToolSpec, task: SubAgentArgs, run_id: str
) -> ToolResult:
    """Run a sub-agent as a child workflow with its own history, budgets and approvals; its
    answer is the tool's result. Cancelling this step (interrupt, the parent's cancellation)
    cancels the child; a parent that ends any other way asks the child to cancel too.
    `run_id` is the child's: `subagent_run_id`.

    The child may spend at most what this run has left (`budget_left`), and what it spent
    counts in this run's usage and budgets (`roll_up`), however it ended."""
    shared = workflow.patched(SHARED_BUDGET_PATCH)
    budget = budget_left(spec, state, workflow.now()) if shared else None
    try:
        result: AgentResult = await workflow.execute_child_workflow(
            WORKFLOW_TYPE,
            AgentInput(agent=tool.agent, message=task.task, user=state.user, budget=budget),
            id=run_id,
            result_type=AgentResult,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
            parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(AGENT_NAME, tool.agent),
                    SearchAttributePair(AGENT_USER, state.user),
                    SearchAttributePair(AGENT_STATUS, AgentStatus.RUNNING.value),
                ]
            ),
            static_summary=f"sub-agent {tool.agent} for {spec.name} · step {state.step}",
        )
    except ChildWorkflowError as e:
        if shared:
            roll_up(state, _failure_usage(e))
        if isinstance(e.cause, CancelledError):
            raise
        return ToolResult(
            ok=False,
            error_type="subagent_failed",
            content=f"Error: sub-agent {tool.agent} ({run_id}) failed: {failure_message(e)}",
        )
    if shared:
        roll_up(state, result.usage)
    if result.status == AgentStatus.COMPLETED:
        return ToolResult(ok=True, content=result.final_answer or "")
    why = f": {result.error}" if result.error else ""
    return ToolResult(
        ok=False,
        error_type="subagent_" + result.status.value,
        content=f"Error: sub-agent {tool.agent} ({run_id}) ended {result.status.value}{why}",
    )


def _failure_usage(e: ChildWorkflowError) -> Usage:
    """What a child that did not complete had spent: its failure carries its usage (runs
    recorded before it did carry none: nothing to count)."""
    cause = e.cause
    details = cause.details if isinstance(cause, ApplicationError) else ()
    try:
        return Usage.model_validate(details[0]) if details else Usage()
    except ValueError:
        return Usage()


def current_details(state: AgentState) -> str:
    """What the Web UI shows as the run's current details (markdown)."""
    lines = [
        f"**{state.status.value}** · step {state.step} · "
        + usage_line(state.usage, state.subagents),
    ]
    if state.provider_error:
        lines.append(f"- the model provider keeps failing: {state.provider_error[:300]}")
    for r in state.pending_approvals:
        who = ", ".join(r.approvers) or "anyone"
        args = short_args(r.arguments, 160)
        lines.append(
            f"- approval needed: `{r.tool}({args})` (`{r.call_id}`) — {r.reason}; "
            f"decided by {who}; expires {r.expires_at:%Y-%m-%d %H:%M} UTC"
        )
    if state.queued_messages:
        lines.append(f"- {len(state.queued_messages)} message(s) queued")
    return "\n".join(lines)


LEAN_STATUS_PATCH = "keel-lean-status"  # runs recorded before it upserted on every count


class StatusPublisher:
    """Keeps the run's search attributes current, upserting only what changed.

    An upsert is a history event and a visibility write, so the counts operators rarely
    filter on while a turn runs (AgentSteps, TotalTokens) are published with the next change
    of status or pending approvals, and at every turn's end; the current details always show
    them live."""

    def __init__(self) -> None:
        self._last: tuple[str, int, int, int] | None = None

    def publish(self, state: AgentState, *, counts: bool = False) -> None:
        """Reflect status and pending approvals in the run's search attributes at once, and
        steps and tokens with them, or when `counts` (a turn ended)."""
        if state.pending_approvals and state.status == AgentStatus.RUNNING:
            state.status = AgentStatus.WAITING_APPROVAL
        elif not state.pending_approvals and state.status == AgentStatus.WAITING_APPROVAL:
            state.status = AgentStatus.RUNNING
        workflow.set_current_details(current_details(state))
        now = (
            state.status.value,
            len(state.pending_approvals),
            state.step,
            state.usage.total_tokens,
        )
        if now == self._last:
            return
        only_counts = self._last is not None and now[:2] == self._last[:2]
        if only_counts and not counts and workflow.patched(LEAN_STATUS_PATCH):
            return
        updates = [
            AGENT_STATUS.value_set(now[0]),
            PENDING_APPROVALS.value_set(now[1]),
            AGENT_STEPS.value_set(now[2]),
            TOTAL_TOKENS.value_set(now[3]),
        ]
        if self._last is None:
            updates += [AGENT_NAME.value_set(state.agent), AGENT_USER.value_set(state.user)]
            # the run's tenant from its own policy snapshot, whoever started it (a client
            # without the policy, a schedule, a parent run); only where a policy names one
            tenant = tenant_of(state.spec.policy if state.spec else None, state.user)
            if tenant:
                updates.append(AGENT_TENANT.value_set(tenant))
        workflow.upsert_search_attributes(updates)
        self._last = now
