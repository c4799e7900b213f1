"""Payloads: every workflow, activity, signal, update and query input/result, in one place.

New fields always get defaults so old histories and old callers keep decoding.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from temporalio.common import SearchAttributeKey

AUDIT_FIELD_CHARS = 500
MAX_REFUSALS = 200  # refused bad input kept in the audit trail; older refusals are counted
DECISIONS_PER_SECOND = 5.0  # decisions a run takes per second, on average (a token bucket) ...
DECISION_BURST = 20  # ... and at once; over it, a decision is refused (a policy may change both)

# --- names on the wire: prefixed, so they never meet a user's own on a shared namespace ----

WORKFLOW_TYPE = "keel.AgentWorkflow"
LOAD_AGENT_SPEC = "keel.load_agent_spec"  # a local activity
LOAD_FORK = "keel.load_fork"  # a forked run reads the state its origin had after a step
CALL_MODEL = "keel.call_model"
RUN_TOOL = "keel.run_tool"
SIGNAL_DECIDE = "keel.decide"
SIGNAL_MESSAGE = "keel.submit_message"
SIGNAL_RESUME = "keel.resume"  # an operator: ask the model provider again now
SIGNAL_STREAM = "keel.model_stream"  # the model activity: the reply as it is written
SIGNAL_SUBAGENT_USAGE = "keel.subagent_usage"  # a cancelled sub-agent: what it spent
UPDATE_DECIDE = "keel.decide_approval"
UPDATE_MESSAGE = "keel.send_message"
QUERY_STATE = "keel.get_state"  # bounded: the transcript's tail, long texts cut
QUERY_TRANSCRIPT = "keel.get_transcript"  # the transcript whole, page by page
QUERY_STATUS = "keel.get_status"  # small: what lists and waits need, no transcript
MCP_LIST_TOOLS = "keel.mcp_list_tools"  # an MCP server's tools, listed once per run and pinned
ARCHIVE_RECORD = "keel.archive_record"  # its input moves a chunk of the record into history

# --- the agent spec (a snapshot of it is recorded in each run's history) -------------------


class ApprovalMode(StrEnum):
    NEVER = "never"
    ALWAYS = "always"
    WHEN = "when"


class Condition(BaseModel):
    """An argument test, e.g. `amount > 100`: `field` is a top-level argument name."""

    field: str
    op: Literal[">", ">=", "<", "<=", "==", "!=", "in", "not in"] = ">"
    value: Any = None


class ApprovalPolicy(BaseModel):
    """When a tool call needs a person's approval, and who may give it."""

    mode: ApprovalMode = ApprovalMode.NEVER
    when: list[Condition] = Field(default_factory=list)  # any condition that holds asks
    approvers: list[str] = Field(default_factory=list)  # empty: anyone may decide
    reason: str = ""


class ToolSpec(BaseModel):
    """What the workflow knows of a tool: its schema for the model and how to run it."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)  # JSON schema
    side_effects: bool = False
    interruptible: bool = True
    start_to_close_seconds: float = 60.0
    heartbeat_seconds: float | None = None
    max_attempts: int = 5
    initial_retry_seconds: float = 1.0
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy)
    agent: str = ""  # set: a sub-agent, run as a child workflow of that agent instead
    local: bool = False  # read-only: runs as a local activity, in the model step's task
    # the worker's environment variables it may read (`ctx.secret`): names only, never values
    secrets: list[str] = Field(default_factory=list)
    # set: a tool of this MCP server (the worker's declaration of that name), called by its
    # own name there; the schema above is the one the run pinned when it listed the server
    mcp_server: str = ""
    mcp_tool: str = ""

    @property
    def is_subagent(self) -> bool:
        return bool(self.agent)


class ModelSettings(BaseModel):
    """Which model to call; empty fields fall back to the worker's environment.

    A provider that keeps failing does not end the run: after `max_attempts` quick retries
    the run waits (status `waiting_provider`), backing off up to `retry_max_seconds`, and
    tries again for as long as its time budget allows; `keel resume` tries at once. When the
    failure is one another model could survive (overloaded, context too long, model gone),
    the step goes to the `fallbacks`, in order."""

    model: str = ""
    base_url: str = ""
    # the worker's environment variable holding this provider's key (never the key itself)
    api_key_env: str = ""
    temperature: float | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # the reply's length, sent as is
    timeout_seconds: float = 60.0
    max_attempts: int = 4  # quick retries of one call, inside one activity's retry policy
    retry_initial_seconds: float = 2.0  # then the run waits, backing off from this ...
    retry_max_seconds: float = 120.0  # ... to this, until the time budget is spent
    tool_choice: str = "auto"  # sent whenever tools are offered ("auto", "required")
    fallbacks: list[ModelSettings] = Field(default_factory=list)
    # ask the provider to stream, and show the reply as it is written (the reply is recorded
    # whole either way; a provider that cannot stream is asked for a whole reply)
    stream: bool = True

    def chain(self) -> list[ModelSettings]:
        """This model, then its fallbacks, in order."""
        return [self, *self.fallbacks]


class Compaction(BaseModel):
    """Keep a long conversation's requests under a size by summarising its oldest messages
    with a model call (keel.workflows.compaction). The transcript keeps every message."""

    # compact when the next request would carry more than this (estimated: 4 characters a
    # token); keep it well under the model's context window
    threshold_tokens: int = Field(default=100_000, ge=1)
    keep_last_messages: int = Field(default=6, ge=1)  # the latest messages always go whole
    instructions: str = ""  # how to summarise ("": Keel's own)


class MessagePolicy(StrEnum):
    QUEUE = "queue"
    INTERRUPT = "interrupt"
    ROLLBACK = "rollback"
    REJECT = "reject"


class ApprovalTimeoutAction(StrEnum):
    REJECT = "reject"
    CANCEL = "cancel"


class ModelPrice(BaseModel):
    """What a model costs, per million tokens (in whatever currency the team counts in)."""

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)


class Limits(BaseModel):
    """Budgets; max_seconds counts working time, not time spent waiting for people. Steps,
    tokens and cost count the run's sub-agents too (keel.workflows.budgets)."""

    max_steps: int = 20
    max_tokens: int = 200_000
    max_seconds: float = 3600.0
    max_cost: float | None = Field(default=None, ge=0)  # None: no money budget
    # per model name (the name the run asks for, or the provider's answer starting with it):
    # turns tokens into cost; a model not priced here costs nothing
    prices: dict[str, ModelPrice] = Field(default_factory=dict)


class Budget(BaseModel):
    """What a parent run has left when it starts a sub-agent: the child's limits are at most
    these (the tighter of these and its own wins). None: no bound from the parent."""

    max_steps: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    deadline: datetime | None = None  # the parent's working time runs out then
    prices: dict[str, ModelPrice] = Field(default_factory=dict)  # the parent's, for the cost


# --- the policy: who may do what (loaded by the worker, recorded in each run's spec) ---------


class _PolicyPart(BaseModel):
    """A part of a policy file: unknown keys are refused when a file is loaded (a typo in a
    security policy must not pass silently), and ignored when a recorded spec is decoded."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("policy_file"):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                known = ", ".join(sorted(cls.model_fields))
                raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {known})")
        return data


class UnsignedDecisions(StrEnum):
    ALLOWED = "allowed"
    REFUSED = "refused"


class Visibility(StrEnum):
    """Whose runs a role sees in `AgentClient.list` / `pending`."""

    OWN = "own"
    TENANT = "tenant"
    ALL = "all"


class PolicyUser(_PolicyPart):
    roles: list[str] = Field(default_factory=list)
    tenant: str = ""
    # ed25519, base64 of the 32 raw bytes (a PEM in the file is converted when it is loaded)
    public_key: str = ""


class PolicyRole(_PolicyPart):
    agents: list[str] = Field(default_factory=list)  # the agents it may start ("*": any)
    max_steps: int | None = Field(default=None, ge=0)  # the least of this and the agent's
    max_tokens: int | None = Field(default=None, ge=0)
    sees: Visibility = Visibility.OWN


class PolicyAgent(_PolicyPart):
    tools: list[str] | None = None  # the tools it may use; None: all its own


class PolicyTool(_PolicyPart):
    approvers: list[str] | None = None  # the roles that may decide its calls
    four_eyes: bool | None = None  # None: the policy's own `four_eyes`


class Policy(_PolicyPart):
    """Who may start which agent, which tools an agent may use, who may decide which calls
    (and with which key), and limits per role. Loaded by the worker (`KEEL_POLICY`), never
    sent by clients; each run records the policy it started with in its spec snapshot."""

    id: str = ""  # a name of its own, e.g. "prod-2026-06"
    digest: str = ""  # sha256 of its canonical JSON, set when it is loaded
    users: dict[str, PolicyUser] = Field(default_factory=dict)
    roles: dict[str, PolicyRole] = Field(default_factory=dict)
    agents: dict[str, PolicyAgent] = Field(default_factory=dict)
    tools: dict[str, PolicyTool] = Field(default_factory=dict)
    default_roles: list[str] = Field(default_factory=list)  # of users it does not name
    # who may decide a tool without an entry of its own (None: any user the policy names)
    default_approvers: list[str] | None = None
    four_eyes: bool = False  # the run's own user may not approve its side-effecting calls
    # None: allowed while no user has a public key, refused once any has
    unsigned_decisions: UnsignedDecisions | None = None
    decisions_per_second: float = Field(default=DECISIONS_PER_SECOND, gt=0)
    decision_burst: int = Field(default=DECISION_BURST, ge=1)


class MCPPin(BaseModel):
    """An MCP server an agent takes tools from, and (once the run listed it) what it pinned:
    the digest of the server's tool list and the names the model sees."""

    server: str
    digest: str = ""  # sha256 of the listed tools (names, descriptions, schemas); "": not yet
    tools: list[str] = Field(default_factory=list)


class AgentSpec(BaseModel):
    """The snapshot of an agent a run keeps for its whole life."""

    name: str
    instructions: str = ""
    model: ModelSettings = Field(default_factory=ModelSettings)
    tools: list[ToolSpec] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    message_policy: MessagePolicy = MessagePolicy.QUEUE
    keep_open_seconds: float = 0.0  # > 0: go idle after a turn and wait for the next message
    approval_timeout_seconds: float = 24 * 3600.0
    on_approval_timeout: ApprovalTimeoutAction = ApprovalTimeoutAction.REJECT
    # the worker stores large payloads outside the history (KEEL_PAYLOAD_DIR, S3): Temporal's
    # 2 MB limit no longer bounds the conversation
    payload_storage: bool = False
    # where its model and tool calls run ("": the run's own task queue), so slow tools
    # cannot starve model calls (KEEL_MODEL_TASK_QUEUE, KEEL_TOOL_TASK_QUEUE)
    model_task_queue: str = ""
    tool_task_queue: str = ""
    policy: Policy | None = None  # the worker's policy when the run started (None: no policy)
    compaction: Compaction | None = None  # None: the oldest turns are left out when too long
    # its MCP servers: listed once when the run starts, their tools then pinned in `tools`
    mcp: list[MCPPin] = Field(default_factory=list)

    def tool(self, name: str) -> ToolSpec | None:
        """The tool of that name, if the agent has it."""
        return next((t for t in self.tools if t.name == name), None)


# --- the conversation ------------------------------------------------------------------------


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str = "{}"  # raw JSON text as the model produced it


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None  # the tool's name, on tool messages
    model: str | None = None  # on the model's messages: which model answered (never sent)
    # on the model's messages: the step that wrote them and what it cost (never sent), so a
    # run can be forked after any step (0 / None: recorded before messages carried them)
    step: int = 0
    usage: Usage | None = None
    # > 0: a summary marker (never sent as such): requests carry its text in place of
    # transcript[1:summarizes], the messages it summarises
    summarizes: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0  # priced by the run's `Limits.prices` (0 when none are set)
    # model steps, where a usage counts them: a run's `subagents` and an `AgentResult`'s
    # usage (the run's own steps and its sub-agents')
    steps: int = 0

    def add(self, other: Usage) -> Usage:
        """The sum of two usages."""
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cost=self.cost + other.cost,
            steps=self.steps + other.steps,
        )


# --- activities -------------------------------------------------------------------------------


class LoadAgentInput(BaseModel):
    agent: str


class ModelInput(BaseModel):
    """One model step. `messages` is the whole context the model sees for this step."""

    agent: str
    step: int
    settings: ModelSettings
    messages: list[ChatMessage]
    tools: list[ToolSpec] = Field(default_factory=list)
    # ids the run used outside `messages` (e.g. in a rolled-back turn): never handed out again
    reserved_call_ids: list[str] = Field(default_factory=list)
    # "" (auto, whenever tools are offered), "none" (tools listed, none may be called), ...
    tool_choice: str = ""
    # where the activity sends the reply as it is written (`keel.model_stream` batches tagged
    # with it); "" for requests made before replies were streamed: not streamed
    stream_id: str = ""
    # the conversation by reference (keel.workflows.transcript_ref): `messages` are those
    # after `base`, the chain head of a prefix the worker's store holds ("" : none, they are
    # the whole context); `head` is the chain head of the whole context ("" : not stored)
    base: str = ""
    head: str = ""


class ModelResult(BaseModel):
    message: ChatMessage
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str = ""
    model: str = ""
    attempt: int = 0  # the activity attempt that answered (its streamed text is the reply's)
    stored: str = ""  # the chain head of the context the worker stored ("" : none)


class TranscriptSegment(BaseModel):
    """A piece of a stored conversation: the messages after `prev` (a chain head, "" for the
    start). Kept under the chain head it ends at, so the same content is stored once."""

    prev: str = ""
    messages: list[ChatMessage] = Field(default_factory=list)


class StreamDelta(BaseModel):
    """A piece of a reply as the provider writes it: text, or a tool call being formed."""

    text: str = Field(default="", max_length=64_000)
    call_index: int = -1  # the tool call this piece belongs to (-1: the reply's text)
    tool: str = Field(default="", max_length=200)  # the call's name, once known
    arguments: str = Field(default="", max_length=64_000)  # more of the call's arguments


class StreamBatch(BaseModel):
    """Deltas of one model call, sent by its activity (the `keel.model_stream` signal)."""

    stream_id: str = Field(max_length=200)  # the ModelInput's: which call of which step
    attempt: int = Field(ge=1)  # the activity attempt writing
    deltas: list[StreamDelta] = Field(max_length=1000)
    # what this attempt sent before is void (its stream went bad; the reply comes whole)
    restart: bool = False


class ToolInput(BaseModel):
    agent: str
    tool: str
    arguments: str
    call_id: str
    idempotency_key: str
    run_id: str = ""
    user: str = ""
    mcp_server: str = ""  # an MCP tool: the server (by the worker's name for it) ...
    mcp_tool: str = ""  # ... and the tool's own name there


class MCPListInput(BaseModel):
    """List one MCP server's tools for a run of this agent (`keel.mcp_list_tools`)."""

    agent: str
    server: str


class MCPToolList(BaseModel):
    """A server's tools as the run pins them, with the options the agent declared applied."""

    server: str
    digest: str
    tools: list[ToolSpec] = Field(default_factory=list)


class ToolResult(BaseModel):
    ok: bool
    content: str
    error_type: str = ""  # "unknown_tool", "invalid_arguments", "tool_failed", ...


class SubAgentArgs(BaseModel):
    """What the model gives a sub-agent: the task, as the first message of its run."""

    task: str = Field(description="What the sub-agent should do, in full sentences")


# --- the run ----------------------------------------------------------------------------------


class AgentStatus(StrEnum):
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    WAITING_PROVIDER = "waiting_provider"  # the model provider keeps failing; the run waits
    IDLE = "idle"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_EXHAUSTED = "budget_exhausted"


TERMINAL_STATUSES = frozenset(
    {
        AgentStatus.COMPLETED,
        AgentStatus.FAILED,
        AgentStatus.CANCELLED,
        AgentStatus.BUDGET_EXHAUSTED,
    }
)


class ApprovalRequest(BaseModel):
    call_id: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    approvers: list[str] = Field(default_factory=list)
    requested_at: datetime
    expires_at: datetime
    step: int = 0
    approver_roles: list[str] = Field(default_factory=list)  # the policy's, when it names any


class Effect(BaseModel):
    """A side-effecting tool call the run has committed."""

    call_id: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str
    result: str = ""
    step: int = 0
    at: datetime | None = None
    run_id: str = ""  # a sub-agent's run, whose own record lists what it changed


class AuditKind(StrEnum):
    """What an audit entry records. Only refusals of bad input are ever dropped."""

    APPROVED = "approved"
    REJECTED = "rejected"  # a person rejected a tool call: a decision, kept
    EDITED = "edited"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"
    MESSAGE = "message"
    ROLLED_BACK = "rolled_back"
    INTERRUPTED = "interrupted"
    RESUME = "resume"
    MODEL_FALLBACK = "model_fallback"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_EXHAUSTED = "budget_exhausted"
    # refusals of bad input: bounded
    DECISION_REFUSED = "decision_refused"
    SIGNAL_REFUSED = "signal_refused"
    MESSAGE_REJECTED = "message_rejected"
    MESSAGE_DUPLICATE = "message_duplicate"  # sent again with the same id: ignored
    TOOL_REFUSED = "tool_refused"  # the model asked for a tool the policy does not allow


REFUSALS = frozenset(
    {
        AuditKind.DECISION_REFUSED,
        AuditKind.SIGNAL_REFUSED,
        AuditKind.MESSAGE_REJECTED,
        AuditKind.MESSAGE_DUPLICATE,
        AuditKind.TOOL_REFUSED,
    }
)
DecisionOutcome = Literal["approved", "rejected", "edited", "expired", "withdrawn"]


class DecisionRecord(BaseModel):
    """How one approval request ended; the run keeps every one, whatever else happens."""

    call_id: str
    outcome: DecisionOutcome
    by: str = ""  # the approver; empty for expired and withdrawn
    at: datetime
    signed: bool = False  # the decision's signature verified against the approver's key


class AuditEntry(BaseModel):
    """A decision, a refused input or a notable event, in the order it happened."""

    at: datetime
    kind: AuditKind
    detail: str = ""
    actor: str = ""
    call_id: str = ""

    @field_validator("detail", "actor", "call_id")
    @classmethod
    def _bounded(cls, v: str) -> str:
        # the audit lives in the run's state: bad input must not make it grow without bound
        return v if len(v) <= AUDIT_FIELD_CHARS else v[: AUDIT_FIELD_CHARS - 1] + "…"


class RecordChunk(BaseModel):
    """Older entries of one of the run's lists, moved out of the carried state into the
    history as the input of a `keel.archive_record` activity (`AgentClient.record` reads
    them back). `start` is the index of the first entry in the run's whole list."""

    list: Literal["audit", "effects", "decisions", "retired_call_ids"]
    start: int
    audit: list[AuditEntry] = Field(default_factory=list)
    effects: list[Effect] = Field(default_factory=list)
    decisions: list[DecisionRecord] = Field(default_factory=list)
    retired_call_ids: list[str] = Field(default_factory=list)


class ListArchive(BaseModel):
    """Where one record list stands: entries `[0, archived)` are in the history's archive;
    the state holds entries from `dropped` on (`dropped <= archived`)."""

    dropped: int = 0
    archived: int = 0
    measured: int = 0  # entries whose bytes are counted in `pending_bytes` (from the first)
    pending_bytes: int = 0  # bytes of the entries not archived yet

    def total(self, held: int) -> int:
        """Entries in the whole list, given how many the state holds."""
        return self.dropped + held


class RecordArchive(BaseModel):
    """How much of the run's record lives in its histories rather than in its state."""

    audit: ListArchive = Field(default_factory=ListArchive)
    effects: ListArchive = Field(default_factory=ListArchive)
    decisions: ListArchive = Field(default_factory=ListArchive)
    retired_call_ids: ListArchive = Field(default_factory=ListArchive)
    chunks: int = 0  # archive chunks written over the run


class QueuedMessage(BaseModel):
    text: str
    policy: MessagePolicy
    sender: str = ""
    received_at: datetime | None = None


# --- the run's event stream (keel watch) ---------------------------------------------------


class EventKind(StrEnum):
    STATUS = "status"  # the run's status changed (status, text: the error if any)
    MODEL_REPLY = "model_reply"  # a model step's answer (text, calls, model, tokens)
    TOOL_STARTED = "tool_started"  # a tool call starts running (tool, arguments)
    TOOL_RESULT = "tool_result"  # a tool call's result (text)
    APPROVAL_REQUESTED = "approval_requested"  # (tool, arguments, detail: the reason)
    APPROVAL_DECIDED = "approval_decided"  # (detail: approved/rejected/edited/expired/...)
    MESSAGE = "message"  # a user message arrived (text, detail: how it was handled)
    ENDED = "ended"  # the run ended (status, text: the answer or the error)
    # the reply being written: more text, or more of a tool call (call_id: its index, tool,
    # arguments); `model_reply` then brings the whole reply, which replaces the pieces
    MODEL_DELTA = "model_delta"
    # the text written so far in this step is void (detail: "retried", "fallback",
    # "interrupted"): a client drops it; a new attempt may stream again
    MODEL_DISCARD = "model_discard"
    # the oldest messages were summarised (text: the summary, detail: which, tokens: its cost)
    COMPACTED = "compacted"


class RunEvent(BaseModel):
    """One thing that happened in a run (what a watcher receives)."""

    kind: EventKind
    at: datetime
    step: int = 0
    status: str = ""
    call_id: str = ""
    tool: str = ""
    arguments: str = ""
    text: str = ""
    detail: str = ""
    model: str = ""
    tokens: int = 0
    by: str = ""
    attempt: int = 0  # on model_delta: the model call's attempt that wrote it


class EventsCarry(BaseModel):
    """The run's event stream as carried across continue-as-new: the events still retained
    for late watchers, and the offset of the first of them (offsets are global to the run)."""

    base_offset: int = 0
    events: list[RunEvent] = Field(default_factory=list)


class OpenStep(BaseModel):
    """A tool step carried into a new history while it waits on people: continue-as-new while
    parked on approvals. The model's reply (the calls) is the transcript's last message."""

    offered: list[ToolSpec] | None = None  # the tools the step offered (None: all the agent's)
    results: dict[str, str] = Field(default_factory=dict)  # call id → result, calls done
    decided: dict[str, DecideInput] = Field(default_factory=dict)  # accepted, not yet acted on


class ForkOrigin(BaseModel):
    """Where a forked run comes from: a run (its id) and the step it was forked after."""

    run_id: str = Field(min_length=1, max_length=1000)
    step: int = Field(ge=1)
    # False: the fork keeps the origin's spec snapshot (its tools, limits and policy);
    # True: it runs on the agent's spec as the worker has it now
    current_spec: bool = False


class RunState(BaseModel):
    """What `get_state` shows of a run: its status, record and conversation (the transcript's
    tail, long texts cut: `transcript_from`, `transcript_of` and `cut` say what is shown)."""

    run_key: str = ""  # the prefix of every idempotency key the run makes
    agent: str = ""
    user: str = ""
    status: AgentStatus = AgentStatus.RUNNING
    step: int = 0
    turn: int = 0
    transcript: list[ChatMessage] = Field(default_factory=list)
    # every model call the run and its sub-agents made: `subagents` is the sub-agents' part
    usage: Usage = Field(default_factory=Usage)
    subagents: Usage = Field(default_factory=Usage)
    pending_approvals: list[ApprovalRequest] = Field(default_factory=list)
    queued_messages: list[QueuedMessage] = Field(default_factory=list)
    effects: list[Effect] = Field(default_factory=list)
    audit: list[AuditEntry] = Field(default_factory=list)
    final_answer: str | None = None
    error: str | None = None
    decisions: list[DecisionRecord] = Field(default_factory=list)  # never dropped
    retired_call_ids: list[str] = Field(default_factory=list)  # calls of rolled-back turns
    audit_dropped: int = 0  # refusals beyond MAX_REFUSALS, dropped (the count is kept)
    started_at: datetime | None = None
    spec: AgentSpec | None = None  # the snapshot the run started with (its policy's digest)
    # a custom loop's own progress (e.g. its plan), carried across continue-as-new with the rest
    loop_state: dict[str, Any] = Field(default_factory=dict)
    provider_error: str = ""  # while waiting_provider: what the provider last said
    forked_from: ForkOrigin | None = None  # set: the run began as a fork (`keel fork`)
    # a fork's: the effects its origin committed up to the step it was forked after (done
    # there, never redone here; `run_id` names the run whose record lists each one)
    inherited_effects: list[Effect] = Field(default_factory=list)
    # set only in a query's answer: the transcript shown starts at this index of `of` messages,
    # and long texts were cut (AgentClient.get_state fetches the rest page by page)
    transcript_from: int = 0
    transcript_of: int = 0
    cut: bool = False
    # set once the run archives its record: the lists above then hold only their latest
    # entries, and `AgentClient.record` reads the rest from the run's histories
    archive: RecordArchive | None = None

    def decision(self, call_id: str) -> DecisionRecord | None:
        """How the approval of this call ended, if it has."""
        return next((d for d in self.decisions if d.call_id == call_id), None)


class AgentState(RunState):
    """Everything a run is, carried whole across continue-as-new: what `get_state` shows and
    the loop's own bookkeeping, which no client reads."""

    turn_start: int = 0  # index in transcript where the current turn began
    paused_seconds: float = 0.0  # time spent waiting for people (approvals, idle): not work
    idle_since: datetime | None = None  # while idle, across continue-as-new
    message_ids: list[str] = Field(default_factory=list)  # the latest ids received, bounded
    empty_replies: int = 0  # empty model replies in a row (one gets a corrective turn)
    open_step: OpenStep | None = None  # a tool step parked on approvals, carried (see OpenStep)
    events: EventsCarry | None = None  # the event stream, set only when carried
    # what runs recorded before `events` carried instead: the SDK's own stream state, kept as
    # the plain JSON it was (keel.workflows.stream reads it once)
    stream: dict[str, Any] | None = None
    stop_turn: MessagePolicy | None = None  # an interrupt or rollback asked for, not yet done
    abort: str = ""  # an approval expired under the "cancel" policy: the run ends cancelled
    # decisions per second (a token bucket): tokens left at `decision_tokens_at` (None: full)
    decision_tokens: float = 0.0
    decision_tokens_at: datetime | None = None
    # "<messages>:<chain head>": the latest model context the worker stored, so the first
    # request of a new history refers to it too (keel.workflows.transcript_ref)
    context_stored: str = ""
    budget: Budget | None = None  # a sub-agent's: what its parent had left when it started

    # called after each audit entry (the workflow's archiver: keel.workflows.archive)
    _recorded: Any = PrivateAttr(default=None)

    def record(self, entry: AuditEntry) -> None:
        """Append to the audit trail. With the record archived, nothing is ever dropped;
        before (runs recorded earlier), refusals of bad input are bounded: past
        MAX_REFUSALS the oldest refusal makes room."""
        self.audit.append(entry)
        if self._recorded is not None:
            self._recorded()
        if entry.kind in REFUSALS and self.archive is None:
            refusals = [i for i, e in enumerate(self.audit) if e.kind in REFUSALS]
            if len(refusals) > MAX_REFUSALS:
                del self.audit[refusals[0]]
                self.audit_dropped += 1

    def used_call_ids(self) -> list[str]:
        """Call ids the run used outside its transcript: never handed out again."""
        ids = {d.call_id for d in self.decisions} | {e.call_id for e in self.effects}
        return sorted(ids | set(self.retired_call_ids))


class RunStatusView(BaseModel):
    """The `keel.get_status` query: a run's status in a few hundred bytes (lists, waits)."""

    status: AgentStatus
    step: int = 0
    usage: Usage = Field(default_factory=Usage)
    subagents: Usage = Field(default_factory=Usage)  # the part of `usage` sub-agents spent
    pending_approvals: list[ApprovalRequest] = Field(default_factory=list)
    error: str | None = None
    keeps_open: bool | None = None  # goes idle between turns (None: spec not loaded yet)


class TranscriptPage(BaseModel):
    """Which part of the transcript to read (the `keel.get_transcript` query)."""

    start: int = 0


class TranscriptSlice(BaseModel):
    start: int
    messages: list[ChatMessage]
    total: int  # messages in the whole transcript
    final_answer: str | None = None  # whole, only on the page past the end (start == total)


class AgentInput(BaseModel):
    """How a run starts: an agent's name, who asks, and the first message."""

    agent: str
    message: str
    user: str = ""
    carry: AgentState | None = None  # set only by continue-as-new
    fork: ForkOrigin | None = None  # set: start from that run's state after that step
    budget: Budget | None = None  # set by a parent run for its sub-agent


class AgentResult(BaseModel):
    status: AgentStatus
    final_answer: str | None = None
    error: str | None = None
    steps: int = 0
    # the run's and its sub-agents' (`usage.steps`: their model steps, all together)
    usage: Usage = Field(default_factory=Usage)


class ForkInput(BaseModel):
    """What a forked run asks of its origin (the `keel.load_fork` activity)."""

    origin: ForkOrigin
    agent: str  # the fork's agent: the origin must be a run of it
    user: str  # who forks: they must be allowed to see the origin
    policy: Policy | None = None  # the worker's policy now, which says who sees what


class ForkState(BaseModel):
    """The origin's state after the step: what the fork starts from."""

    transcript: list[ChatMessage]
    usage: Usage
    effects: list[Effect] = Field(default_factory=list)
    spec: AgentSpec | None = None  # the origin's snapshot


# --- signals and updates ----------------------------------------------------------------------


class Decision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"


class DecideInput(BaseModel):
    """A person's decision on a pending approval (the `decide` signal / update)."""

    call_id: str = Field(max_length=200)
    decision: Decision
    approver: str = Field(max_length=200)
    reason: str = Field(default="", max_length=2000)
    arguments: dict[str, Any] | None = None  # for "edit": the arguments to change
    # ed25519 over the canonical decision (keel.workflows.authz.decision_message), base64;
    # required where the run's policy refuses unsigned decisions
    signature: str = Field(default="", max_length=200)
    signed_at: datetime | None = None


class DecideReceipt(BaseModel):
    call_id: str
    decision: Decision
    approver: str
    accepted: bool = True
    arguments: dict[str, Any] | None = None  # what the call runs with, once approved
    note: str = ""  # e.g. sent as a signal: no worker serves the run yet


class MessageInput(BaseModel):
    """A user message sent mid-run (the `submit_message` signal / `send_message` update)."""

    text: str
    policy: MessagePolicy | None = None  # None: the agent's default
    sender: str = Field(default="", max_length=200)
    # made by the sender: a message sent again with the same id (a retry, a resend after an
    # unknown outcome, an update replayed into the next history) is delivered only once
    id: str = Field(default="", max_length=200)


class SubagentUsage(BaseModel):
    """What a sub-agent spent, sent to its parent when it is cancelled (a cancellation
    carries no result to read it from)."""

    run_id: str = Field(max_length=1000)  # the child's run
    usage: Usage


class MessageReceipt(BaseModel):
    # duplicate: a message with this id was received before, and delivered once
    status: Literal["queued", "delivered", "rejected", "duplicate"]
    policy: MessagePolicy
    reason: str = ""


# --- search attributes (registered on the server at worker start) -----------------------------

AGENT_NAME = SearchAttributeKey.for_keyword("AgentName")
AGENT_STATUS = SearchAttributeKey.for_keyword("AgentStatus")
AGENT_USER = SearchAttributeKey.for_keyword("AgentUser")
AGENT_TENANT = SearchAttributeKey.for_keyword("AgentTenant")  # the user's, from the policy
PENDING_APPROVALS = SearchAttributeKey.for_int("PendingApprovals")
AGENT_STEPS = SearchAttributeKey.for_int("AgentSteps")
TOTAL_TOKENS = SearchAttributeKey.for_int("TotalTokens")
SEARCH_ATTRIBUTES: list[SearchAttributeKey[Any]] = [
    AGENT_NAME,
    AGENT_STATUS,
    AGENT_USER,
    PENDING_APPROVALS,
    AGENT_STEPS,
    TOTAL_TOKENS,
    AGENT_TENANT,
]
