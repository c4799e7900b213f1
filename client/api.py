"""AgentClient: start runs, watch them, approve, message and cancel them from Python."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, Field
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.workflow_streams import WorkflowStreamClient
from temporalio.exceptions import ApplicationError, CancelledError, FailureError
from temporalio.service import RPCError, RPCStatusCode

from keel.client.presence import worker_arrives, worker_polls
from keel.client.record import RecordGap, RunRecord, archived_chunks, join
from keel.client.sending import (
    MAX_REQUEST_BYTES,
    MESSAGES_IN_FLIGHT,
    SEND_ATTEMPTS,
    SEND_RETRY_FIRST,
    SEND_RETRY_MAX,
    SERVED_TRUST,
    Gate,
    SendFailure,
    send_failure,
)
from keel.client.signing import load_signing_key, sign_decision
from keel.client.visibility import (
    NOT_CONTINUED,
    may_see,
    quoted,
    run_status,
    status_query,
    visibility_query,
)
from keel.config import Settings, SettingsError, connect
from keel.policy_file import PolicyError
from keel.workflows import errors
from keel.workflows.authz import start_refusal, tenant_of, visibility
from keel.workflows.base import KeelWorkflow
from keel.workflows.budgets import run_usage
from keel.workflows.decisions import DecisionTarget
from keel.workflows.events import TOPIC, EventKind, RunEvent
from keel.workflows.models import (
    AGENT_NAME,
    AGENT_STATUS,
    AGENT_STEPS,
    AGENT_TENANT,
    AGENT_USER,
    PENDING_APPROVALS,
    SIGNAL_DECIDE,
    SIGNAL_MESSAGE,
    SIGNAL_RESUME,
    TERMINAL_STATUSES,
    TOTAL_TOKENS,
    WORKFLOW_TYPE,
    AgentInput,
    AgentResult,
    AgentStatus,
    ApprovalRequest,
    ChatMessage,
    DecideInput,
    DecideReceipt,
    Decision,
    ForkOrigin,
    MessageInput,
    MessagePolicy,
    MessageReceipt,
    Policy,
    RunState,
    RunStatusView,
    TranscriptPage,
    TranscriptSlice,
    Usage,
    Visibility,
)
from keel.workflows.steps import WORKFLOW_TASK_TIMEOUT

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from keel.client.schedules import Schedules

T = TypeVar("T")
POLL_EVERY = 0.25
QUERY_TIMEOUT = timedelta(seconds=30)  # a busy worker replaying a long history still answers
LIST_QUERY_TIMEOUT = timedelta(seconds=10)  # per run, when listing many
ACCEPT_TIMEOUT = timedelta(seconds=15)  # a worker takes an update at once (busy: in seconds)
UPDATE_TIMEOUT = timedelta(seconds=30)
# a decision's update answers within milliseconds when a worker serves the run: past this,
# ask whether one does (else the decision goes as a signal that keeps)
ANSWER_GRACE = 1.0
# a query sent is let finish though its answer is no longer wanted: one abandoned midway
# leaves the worker an answer for a query that is gone, and it warns "Query not found"
QUERY_DRAIN_SECONDS = 5.0
# Every Keel run, whatever its loop, carries AgentName from its start.
KEEL_RUNS = "AgentName IS NOT NULL"
FORK_MEMO = "keel.forked_from"  # a fork's memo: the run and step it began from


POLL_COOLDOWN = timedelta(milliseconds=25)  # between a watcher's polls of a run's events


class KeelClientError(Exception):
    """A request Keel refused, with the reason the run gave."""


class NoWorker(KeelClientError):
    """No worker serves the run's task queue, so the run cannot answer a query now."""


class MessageTooLarge(KeelClientError):
    """A message too large for one Temporal request: refused before sending, never retried."""


class RunSummary(BaseModel):
    run_id: str
    agent: str = ""
    status: str = ""
    user: str = ""
    steps: int = 0
    tokens: int = 0
    started: datetime | None = None
    temporal_status: str = ""
    error: str = ""
    task_queue: str = ""  # where its workflow tasks wait for a worker

    agent_status: str = ""  # the AgentStatus the run upserted last (`status` is the truth)

    @classmethod
    def of(
        cls,
        run_id: str,
        sa: TypedSearchAttributes,
        started: datetime | None,
        task_queue: str = "",
        execution: WorkflowExecutionStatus | None = None,
    ) -> RunSummary:
        """A run as its search attributes and its latest execution's status describe it."""
        upserted = sa.get(AGENT_STATUS) or ""
        return cls(
            run_id=run_id,
            agent=sa.get(AGENT_NAME) or "",
            status=run_status(upserted, execution),
            agent_status=upserted,
            user=sa.get(AGENT_USER) or "",
            steps=sa.get(AGENT_STEPS) or 0,
            tokens=sa.get(TOTAL_TOKENS) or 0,
            started=started,
            temporal_status=execution.name.lower() if execution else "",
            task_queue=task_queue,
        )


class PendingApproval(BaseModel):
    run_id: str
    call_id: str
    tool: str
    arguments: dict[str, Any]
    reason: str
    approvers: list[str]
    age_seconds: float
    expires_at: datetime | None = None
    # False: no worker serves the run, so its approvals cannot be read (the count can)
    reachable: bool = True
    # the tool's JSON schema, to build an edit form from (`pending(schemas=True)`)
    parameters: dict[str, Any] = Field(default_factory=dict)


class AgentClient:
    """The Python API over Keel runs, whatever loop they run. A run's id is its Temporal
    workflow id. `client` must use Keel's data converter (KeelPlugin or keel.connect)."""

    def __init__(
        self,
        client: Client,
        settings: Settings | None = None,
        *,
        task_queue: str | None = None,
        as_user: str | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.client = client
        self.settings = settings or Settings.from_env()
        self.task_queue = task_queue or self.settings.task_queue
        # who calls (KEEL_USER): `start` runs as them, `list` and `pending` show what they
        # may see. Their identity is the caller's word; see docs/security.md
        self.as_user = as_user if as_user is not None else self.settings.user
        if policy is None and self.settings.policy_file:
            from keel.activities.registry import load_policy

            try:
                policy = load_policy(self.settings.policy_file)
            except PolicyError as e:
                raise SettingsError(f"KEEL_POLICY: {e}") from None
        self.policy = policy  # the workers' policy, to refuse early (workers decide)
        self._gates: dict[str, Gate] = {}  # per run: this client's messages in flight
        self._served_at: dict[str, float] = {}  # per run: when a worker was seen serving it

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> AgentClient:
        """Connect from the environment (Temporal's profile, KEEL_TASK_QUEUE, ...)."""
        s = settings or Settings.from_env()
        return cls(await connect(s), s)

    def _handle(self, run_id: str) -> WorkflowHandle[Any, AgentResult]:
        return self.client.get_workflow_handle(run_id, result_type=AgentResult)

    async def start(
        self,
        agent: str,
        message: str,
        *,
        user: str = "",
        run_id: str | None = None,
        execution_timeout: timedelta | None = None,
        loop: str | type = WORKFLOW_TYPE,
        task_queue: str | None = None,
    ) -> str:
        """Start a run of `agent` on `message`; returns the run id. `loop` is the workflow
        that runs it: Keel's default loop, or a KeelWorkflow of your own (class or type name);
        `task_queue` is where its workers poll (default: the client's, KEEL_TASK_QUEUE).

        `user` defaults to the caller (`as_user`). With the workers' policy known here, a
        user it does not let start this agent is refused at once (the run would fail at its
        start), a caller may start runs only as themselves unless a role of theirs sees all
        runs, and the run carries the user's tenant (`AgentTenant`)."""
        user = user or self.as_user or ""
        options = self.start_options(agent, message, user)
        if self.policy is not None:
            refused = start_refusal(self.policy, agent, user)
            if refused:
                raise KeelClientError(refused)
            caller = self.as_user
            if caller and user != caller and visibility(self.policy, caller) != Visibility.ALL:
                raise KeelClientError(f"{caller!r} may start runs only as themselves, not {user!r}")
            tenant = tenant_of(self.policy, user)
            if tenant:
                pairs = options["search_attributes"].search_attributes
                options["search_attributes"] = TypedSearchAttributes(
                    [*pairs, SearchAttributePair(AGENT_TENANT, tenant)]
                )
        run_id = run_id or f"{agent}-{uuid.uuid4().hex[:12]}"
        await self.client.start_workflow(
            workflow_type(loop),
            AgentInput(agent=agent, message=message, user=user),
            id=run_id,
            task_queue=task_queue or self.task_queue,
            result_type=AgentResult,
            execution_timeout=execution_timeout,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
            **options,
        )
        return run_id

    @staticmethod
    def start_options(agent: str, message: str, user: str, schedule: str = "") -> dict[str, Any]:
        """What every run starts with: its static summary (the Web UI's list shows it) and
        the search attributes operators filter on."""
        by = f" (schedule {schedule})" if schedule else ""
        return {
            "static_summary": f"{agent} for {user or 'anyone'}{by}: {message[:120]}",
            "search_attributes": TypedSearchAttributes(
                [
                    SearchAttributePair(AGENT_NAME, agent),
                    SearchAttributePair(AGENT_USER, user),
                    SearchAttributePair(AGENT_STATUS, AgentStatus.RUNNING.value),
                ]
            ),
        }

    @property
    def schedules(self) -> Schedules:
        """Schedules that start runs of agents (cron or interval, explicit overlap)."""
        from keel.client.schedules import Schedules

        return Schedules(self)

    async def events(
        self, run_id: str, *, from_offset: int = 0, follow: bool = True
    ) -> AsyncIterator[tuple[int, RunEvent]]:
        """The run's events from `from_offset` (its latest 300 at most, for a long run), each
        with its offset, in order, each once; then, with `follow`, live as they happen, across
        continue-as-new, until the run ends. Pass the last offset seen + 1 to resume."""
        stream = WorkflowStreamClient.create(self.client, run_id)
        if not follow:
            upto = await stream.get_offset()
            if from_offset >= upto:
                return
        try:
            # a short pause between polls: a reply's last pieces and the run's end often come
            # within 100 ms (the SDK's default), and a poll that finds the run closed must read
            # the rest through a query, which replays the run's whole history
            async for item in stream.subscribe(
                TOPIC, from_offset, result_type=RunEvent, poll_cooldown=POLL_COOLDOWN
            ):
                yield item.offset, item.data
                if item.data.kind == EventKind.ENDED or (not follow and item.offset + 1 >= upto):
                    return
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise KeelClientError(f"run {run_id}: {e.message}") from e
            raise

    async def get_state(self, run_id: str, *, timeout: timedelta = QUERY_TIMEOUT) -> RunState:
        """The run's state: status, step, the whole transcript, usage, approvals, and the
        latest 300 entries of its effects, decisions and audit trail. Reading it needs a
        worker serving the run; without one, NoWorker says so."""
        handle = self._handle(run_id)
        try:
            state = await handle.query(KeelWorkflow.get_state, rpc_timeout=timeout)
            if state.transcript_from or state.cut:
                # the answer was bounded: read the rest, page by page
                messages: list[ChatMessage] = []
                while True:
                    page = await handle.query(
                        KeelWorkflow.get_transcript,
                        TranscriptPage(start=len(messages)),
                        rpc_timeout=timeout,
                    )
                    messages += page.messages
                    if len(messages) >= page.total or not page.messages:
                        break
                last = await handle.query(
                    KeelWorkflow.get_transcript,
                    TranscriptPage(start=len(messages)),
                    rpc_timeout=timeout,
                )
                state.transcript, state.final_answer = messages, last.final_answer
                state.transcript_from, state.transcript_of, state.cut = 0, len(messages), False
            return state
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
            raise await self._query_failed(run_id, e, timeout) from e

    async def status(self, run_id: str, *, timeout: timedelta = QUERY_TIMEOUT) -> RunStatusView:
        """The run's status, step, usage and open approvals: a small answer (no transcript),
        for lists and waits. Needs a worker serving the run, as `get_state` does."""
        try:
            return await self._handle(run_id).query(KeelWorkflow.get_status, rpc_timeout=timeout)
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
            raise await self._query_failed(run_id, e, timeout) from e

    async def transcript(
        self, run_id: str, start: int = 0, *, timeout: timedelta = QUERY_TIMEOUT
    ) -> TranscriptSlice:
        """One page of the run's whole transcript from message `start` (about a megabyte of
        whole messages); the page at the end carries the final answer whole."""
        try:
            return await self._handle(run_id).query(
                KeelWorkflow.get_transcript, TranscriptPage(start=start), rpc_timeout=timeout
            )
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
            raise await self._query_failed(run_id, e, timeout) from e

    async def record(self, run_id: str) -> RunRecord:
        """The run's whole record: every audit entry, effect, decision and retired call id,
        in order. A run keeps only the latest of each in its state; the rest is read from
        the chunks it archived into its chain of histories (one history read each)."""
        for _ in range(3):
            state = await self.get_state(run_id)
            try:
                chunks, histories = await archived_chunks(self.client, run_id)
            except RPCError as e:
                raise KeelClientError(f"run {run_id}: {e.message}") from e
            try:
                return join(run_id, state, chunks, histories)
            except RecordGap as gap:  # archived as we read: the next read has it
                missing = gap
        raise KeelClientError(f"run {run_id}: the record is incomplete: {missing}")

    async def _query_failed(self, run_id: str, e: Exception, timeout: timedelta) -> KeelClientError:
        """What a failed query means, said plainly (NoWorker when no worker answered)."""
        message = getattr(e, "message", str(e))
        if isinstance(e, RPCError) and e.status in (
            RPCStatusCode.NOT_FOUND,
            RPCStatusCode.INVALID_ARGUMENT,
        ):
            return KeelClientError(f"run {run_id}: {message}")
        if not isinstance(e, RPCError):  # the run answered: with a refusal or an error
            return KeelClientError(f"run {run_id}: the query failed: {message}")
        queue = await self._task_queue_or_none(run_id)
        if "poller" in message or (queue and await worker_polls(self.client, queue) is False):
            return no_worker(run_id, queue, message)
        where = f"task queue {queue!r}" if queue else "its task queue"
        return NoWorker(
            f"run {run_id}: no worker answered within {timeout.total_seconds():.0f} s "
            f"({message}); is one serving {where}?"
        )

    async def _task_queue_or_none(self, run_id: str) -> str | None:
        try:
            return (await self._handle(run_id).describe()).task_queue
        except RPCError:
            return None

    async def summary(self, run_id: str) -> RunSummary:
        """What Temporal itself knows of a run (no worker needed): status, agent, counts,
        and how it ended."""
        try:
            desc = await self._handle(run_id).describe()
        except RPCError as e:
            raise KeelClientError(f"run {run_id}: {e.message}") from e
        sa = desc.typed_search_attributes
        ending = ""
        if desc.status not in (None, WorkflowExecutionStatus.RUNNING):
            try:
                await self._handle(run_id).result(rpc_timeout=QUERY_TIMEOUT)
            except WorkflowFailureError as e:
                ending = _cause(e)
            except RPCError:
                pass
        summary = RunSummary.of(run_id, sa, desc.start_time, desc.task_queue, desc.status)
        summary.error = ending
        return summary

    async def result(self, run_id: str, timeout: float | None = None) -> AgentResult:
        """Wait for the run's latest answer: when it ends, or goes idle after a turn."""
        handle = self._handle(run_id)
        reads: set[asyncio.Task[Any]] = set()

        async def read(query: Awaitable[T]) -> T:
            # let a query finish though its answer is no longer wanted (see QUERY_DRAIN_SECONDS)
            task = asyncio.ensure_future(query)
            reads.add(task)
            task.add_done_callback(reads.discard)
            return await asyncio.shield(task)

        async def ended() -> AgentResult:
            try:
                return await handle.result()
            except WorkflowFailureError as e:
                state = await self._state_or_none(run_id)
                status = state.status if state else _ending(e)
                if status not in TERMINAL_STATUSES:
                    status = _ending(e)
                return AgentResult(
                    status=status,
                    final_answer=state.final_answer if state else None,
                    error=(state.error if state else None) or _cause(e),
                    steps=state.step if state else 0,
                    usage=run_usage(state) if state else Usage(),
                )

        async def idle() -> AgentResult:
            # no polling: read where the run's event stream is, look at its status once,
            # then follow the stream from there until it says idle (a status it reached
            # after that look is in the stream past that offset)
            stream = WorkflowStreamClient.create(self.client, run_id)
            while True:
                try:
                    start = await read(stream.get_offset())
                    view = await read(
                        handle.query(KeelWorkflow.get_status, rpc_timeout=QUERY_TIMEOUT)
                    )
                except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
                    await asyncio.sleep(POLL_EVERY)  # no worker yet, or the run just started
                    continue
                if view.status == AgentStatus.IDLE:
                    state = await read(self._state_or_none(run_id))
                    if state is not None and state.status == AgentStatus.IDLE:
                        return AgentResult(
                            status=state.status,
                            final_answer=state.final_answer,
                            steps=state.step,
                            usage=run_usage(state),
                        )
                    continue
                if view.keeps_open is None:  # not loaded yet: the first task is under way
                    await asyncio.sleep(POLL_EVERY)
                    continue
                closes = not view.keeps_open
                if closes or view.status in TERMINAL_STATUSES:
                    # it never goes idle (or has ended): `ended` answers, and the run's
                    # history gets no watcher's polls
                    await asyncio.Event().wait()
                async for _, event in self.events(run_id, from_offset=start):
                    if event.kind == EventKind.STATUS and event.status == AgentStatus.IDLE:
                        break
                else:
                    await asyncio.Event().wait()  # the run ended: `ended` answers

        try:
            closed = (await handle.describe()).status not in (None, WorkflowExecutionStatus.RUNNING)
        except RPCError:
            closed = False  # `ended` says why
        # a closed run's answer is its result: no query for a turn that cannot come
        waits = [asyncio.create_task(ended())] + ([] if closed else [asyncio.create_task(idle())])
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
            if not done:
                raise TimeoutError(f"run {run_id} gave no answer within {timeout} s")
            return done.pop().result()
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            if reads:
                await asyncio.wait(list(reads), timeout=QUERY_DRAIN_SECONDS)
                for r in list(reads):
                    r.cancel()

    async def _state_or_none(self, run_id: str) -> RunState | None:
        try:
            return await self.get_state(run_id)
        except KeelClientError:
            return None

    async def list(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        as_user: str | None = None,
        agent: str | None = None,
    ) -> list[RunSummary]:
        """Recent runs, newest first, one row each (its latest execution: continue-as-new and
        reset make several of one run), optionally only those with this status (an
        AgentStatus, `terminated` or `timed_out`, as `run_status` derives it from Temporal's
        own status) and of this agent; with a caller (`as_user`, default the client's), only
        the runs they may see."""
        query = f"{KEEL_RUNS} AND {NOT_CONTINUED}"
        if status:
            try:
                query += status_query(status)
            except ValueError as e:
                raise KeelClientError(str(e)) from None
        if agent:
            try:
                query += f" AND AgentName = {quoted(agent)}"
            except PolicyError as e:
                raise KeelClientError(f"agent: {e}") from None
        query += self._visible(as_user)
        out: list[RunSummary] = []
        seen: set[str] = set()
        # newest first: an open execution, then by close time, so a run's latest comes first
        async for wf in self.client.list_workflows(query, page_size=min(2 * limit + 10, 1000)):
            if wf.id in seen:
                continue
            seen.add(wf.id)
            if (
                wf.status != WorkflowExecutionStatus.RUNNING
                and status
                and not (await self._is_latest(wf.id, wf.run_id))
            ):
                continue  # a closed execution its run has moved on from (a reset)
            out.append(
                RunSummary.of(
                    wf.id, wf.typed_search_attributes, wf.start_time, wf.task_queue, wf.status
                )
            )
            if len(out) >= limit:
                break
        return out

    async def _is_latest(self, run_id: str, execution: str) -> bool:
        """Whether this execution is its run's latest (one filtered list cannot tell)."""
        try:
            return (await self._handle(run_id).describe()).run_id == execution
        except RPCError:
            return True

    def _visible(self, as_user: str | None) -> str:
        """The filter of what the caller may list ('' for a client that names no caller).
        A convenience, not isolation: anyone with the namespace can list every run."""
        who = as_user if as_user is not None else self.as_user
        if who is None:
            return ""
        try:
            return visibility_query(self.policy, who)
        except PolicyError as e:
            raise KeelClientError(str(e)) from None

    async def approve(
        self,
        run_id: str,
        call_id: str,
        approver: str,
        edit: dict[str, Any] | None = None,
        *,
        wait: bool = True,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> DecideReceipt:
        """Approve a pending tool call, optionally changing some of its arguments."""
        decision = Decision.EDIT if edit is not None else Decision.APPROVE
        return await self.decide(
            run_id,
            DecideInput(call_id=call_id, decision=decision, approver=approver, arguments=edit),
            wait=wait,
            signing_key=signing_key,
        )

    async def reject(
        self,
        run_id: str,
        call_id: str,
        approver: str,
        reason: str,
        *,
        wait: bool = True,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> DecideReceipt:
        """Reject a pending tool call; the model sees the reason as the tool's result."""
        return await self.decide(
            run_id,
            DecideInput(
                call_id=call_id, decision=Decision.REJECT, approver=approver, reason=reason
            ),
            wait=wait,
            signing_key=signing_key,
        )

    async def decide(
        self,
        run_id: str,
        decision: DecideInput,
        *,
        wait: bool = True,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> DecideReceipt:
        """Send a decision through the `decide_approval` update; a refusal raises.

        Signed with `signing_key` (default: the key file KEEL_APPROVER_KEY names, if any)
        for this run, this call and this moment: a run whose policy names the approver's
        public key accepts only what verifies against it.

        With no worker serving the run (or `wait=False`), the decision goes as the
        `keel.decide` signal instead: it is kept, and applies (or is refused, as the run's
        audit trail then says) when a worker serves the run; the receipt's note says so."""
        if signing_key is None and self.settings.approver_key:
            path = self.settings.approver_key
            signing_key = load_approver_key(path, f"KEEL_APPROVER_KEY={path}")
        handle = self._handle(run_id)
        if signing_key is not None:
            # bound to this run: its chain's first run id tells it from a later run that
            # reuses the workflow id
            try:
                info = (await handle.describe()).raw_description.workflow_execution_info
            except RPCError as e:
                raise KeelClientError(f"run {run_id}: {e.message}") from e
            target = DecisionTarget(self.client.namespace, run_id, info.first_run_id)
            decision = sign_decision(signing_key, decision, target, datetime.now(UTC))
        why = "sent without waiting"
        try:
            if wait:
                receipt = await self._decide_by_update(handle, decision)
                if receipt is not None:
                    return receipt
                why = "no worker is serving this run"
            # (if the update was only slow, it still applies first, and this copy is
            # recorded as refused: "already decided")
            await handle.signal(SIGNAL_DECIDE, decision)
        except WorkflowUpdateFailedError as e:
            raise KeelClientError(_cause(e)) from e
        except RPCError as e:
            raise KeelClientError(f"run {run_id}: {e.message}") from e
        return DecideReceipt(
            call_id=decision.call_id,
            decision=decision.decision,
            approver=decision.approver,
            note=(
                f"{why}: the decision is kept and applies when a worker serves the run "
                f"(`keel status {run_id}` then shows it applied, or why it was refused)"
            ),
        )

    async def _decide_by_update(
        self, handle: WorkflowHandle[Any, AgentResult], decision: DecideInput
    ) -> DecideReceipt | None:
        """The `decide_approval` update's receipt, in one round trip when a worker serves the
        run; None when none takes it (the decision then goes as a signal, which keeps). Who
        serves the run is asked only when the answer is slow in coming, so a decision costs
        no reads when a worker is there."""
        update = asyncio.ensure_future(
            handle.execute_update(
                KeelWorkflow.decide_approval, decision, rpc_timeout=UPDATE_TIMEOUT
            )
        )
        try:
            done, _ = await asyncio.wait({update}, timeout=ANSWER_GRACE)
            if not done:
                if not await self.has_worker(handle.id):
                    return None
                # a worker polled lately: it may be busy, or gone since
                done, _ = await asyncio.wait({update}, timeout=ACCEPT_TIMEOUT.total_seconds())
                if not done:
                    return None
            return update.result()
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            return None  # no worker took it in time
        finally:
            if not update.done():
                update.cancel()
                await asyncio.gather(update, return_exceptions=True)

    async def has_worker(self, run_id: str) -> bool:
        """Whether a worker has polled the run's task queue lately."""
        queue = await self._task_queue_or_none(run_id)
        if queue is None:
            return True  # cannot tell: try the update, which answers for itself
        return await worker_polls(self.client, queue) is not False

    async def worker_arrives(self, task_queue: str | None = None, patience: float = 0.0) -> bool:
        """Whether a worker polls `task_queue` (default: the client's) now or within
        `patience` seconds; a run started there waits, in silence, until one does."""
        return await worker_arrives(self.client, task_queue or self.task_queue, patience)

    async def send_message(
        self,
        run_id: str,
        text: str,
        policy: MessagePolicy | str | None = None,
        sender: str = "",
        message_id: str | None = None,
    ) -> MessageReceipt:
        """Send a message mid-run; the receipt says queued, delivered (or duplicate: sent
        before, delivered once) or why it was refused.

        The message carries an id (made here unless given), so sending it again is safe: a
        run busy with other messages or an answer lost on the way is retried here under the
        same id, and a message is delivered exactly once. This client sends at most
        MESSAGES_IN_FLIGHT updates to one run at a time (Temporal refuses more than 10), so a
        burst waits here instead of being refused there. A message too large to send at all
        raises MessageTooLarge at once. When the outcome stays unknown, KeelClientError says
        so and names the id to resend."""
        m = MessageInput(
            text=text,
            policy=MessagePolicy(policy) if policy else None,
            sender=sender,
            id=message_id or uuid.uuid4().hex,
        )
        size = (await self.client.data_converter.encode([m]))[0].ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise MessageTooLarge(
                f"run {run_id}: the message is {size} bytes encoded, over the "
                f"{MAX_REQUEST_BYTES}-byte limit of one Temporal request; it was not sent"
            )
        handle = self._handle(run_id)
        if not await self._served(run_id):  # retries below are for busy runs
            return await self._send_as_signal(handle, m)
        async with self._door(run_id):
            return await self._send_by_update(handle, m)

    async def _served(self, run_id: str) -> bool:
        """`has_worker`, trusted for SERVED_TRUST seconds per run: a burst asks once."""
        now = asyncio.get_running_loop().time()
        if now - self._served_at.get(run_id, -SERVED_TRUST) < SERVED_TRUST:
            return True
        if not await self.has_worker(run_id):
            return False
        if len(self._served_at) > 10_000:
            self._served_at.clear()
        self._served_at[run_id] = now
        return True

    @contextlib.asynccontextmanager
    async def _door(self, run_id: str) -> AsyncIterator[None]:
        """A slot among this client's updates in flight to `run_id`."""
        gate = self._gates.get(run_id)
        if gate is None:
            gate = self._gates[run_id] = Gate(MESSAGES_IN_FLIGHT)
        gate.users += 1
        try:
            async with gate.slots:
                yield
        finally:
            gate.users -= 1
            if not gate.users:
                del self._gates[run_id]

    async def _send_by_update(
        self, handle: WorkflowHandle[Any, AgentResult], m: MessageInput
    ) -> MessageReceipt:
        delay = SEND_RETRY_FIRST
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                update = await handle.start_update(
                    KeelWorkflow.send_message,
                    m,
                    id=f"message-{m.id}",  # a resend is the same update: answered once
                    wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                    rpc_timeout=ACCEPT_TIMEOUT,
                )
                return await update.result(rpc_timeout=UPDATE_TIMEOUT)
            except WorkflowUpdateFailedError as e:
                return MessageReceipt(
                    status="rejected", policy=m.policy or MessagePolicy.QUEUE, reason=_cause(e)
                )
            except RPCError as e:
                kind = send_failure(e)
                if kind == SendFailure.GONE:
                    return MessageReceipt(
                        status="rejected",
                        policy=m.policy or MessagePolicy.QUEUE,
                        reason=f"run {handle.id}: {e.message}",
                    )
                if kind == SendFailure.TOO_LARGE:
                    raise MessageTooLarge(
                        f"run {handle.id}: the message is too large to send ({e.message})"
                    ) from e
                if attempt == SEND_ATTEMPTS or kind == SendFailure.OTHER:
                    why = "is busy with other messages" if kind == SendFailure.BUSY else ""
                    raise KeelClientError(
                        f"run {handle.id} {why or 'did not answer'} ({e.message}); the message "
                        f"may not have arrived: send it again with message_id={m.id!r}, it is "
                        "delivered only once"
                    ) from e
            except WorkflowUpdateRPCTimeoutOrCancelledError:
                # no worker took it in time: a signal keeps it (its id keeps it single)
                self._served_at.pop(handle.id, None)
                return await self._send_as_signal(handle, m)
            # full jitter: senders refused together do not come back together
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, SEND_RETRY_MAX)
        raise AssertionError("unreachable")

    async def _send_as_signal(
        self, handle: WorkflowHandle[Any, AgentResult], m: MessageInput
    ) -> MessageReceipt:
        try:
            await handle.signal(SIGNAL_MESSAGE, m)
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise KeelClientError(f"run {handle.id}: {e.message}") from e
            return MessageReceipt(
                status="rejected",
                policy=m.policy or MessagePolicy.QUEUE,
                reason=f"run {handle.id}: {e.message}",
            )
        return MessageReceipt(
            status="queued",
            policy=m.policy or MessagePolicy.QUEUE,
            reason=(
                "no worker is serving this run: the message is kept and delivered once when "
                "one does (it may still be refused then, as the run's audit trail will say)"
            ),
        )

    async def resume(self, run_id: str) -> None:
        """Ask a run waiting on its model provider (a key fixed, an outage over) to try now."""
        try:
            await self._handle(run_id).signal(SIGNAL_RESUME)
        except RPCError as e:
            raise KeelClientError(f"run {run_id}: {e.message}") from e

    async def cancel(self, run_id: str) -> None:
        """Cancel the run: in-flight activities are cancelled, the record is kept."""
        await self._handle(run_id).cancel()

    async def fork(
        self,
        run_id: str,
        at_step: int,
        message: str = "",
        *,
        user: str = "",
        new_run_id: str | None = None,
        current_spec: bool = False,
        execution_timeout: timedelta | None = None,
    ) -> str:
        """Start a new run from the state `run_id` had after step `at_step` (running or
        closed); returns the new run's id. It runs the same loop of the same agent, keeps
        the origin's spec snapshot (or the agent's spec now, with `current_spec`), and goes
        on with `message` if given, else from where step `at_step` left off.

        The origin's effects of steps 1..N are listed as inherited and never redone; the
        fork makes its own idempotency keys, so effects the origin made after step N are
        not undone, and a call the fork makes again is a new effect. Only a caller who may
        see the origin may fork it (the worker checks again, with its policy)."""
        if at_step < 1:
            raise KeelClientError(f"--at-step must be 1 or more, got {at_step}")
        try:
            desc = await self._handle(run_id).describe()
        except RPCError as e:
            raise KeelClientError(f"run {run_id}: {e.message}") from e
        sa = desc.typed_search_attributes
        agent, owner = sa.get(AGENT_NAME) or "", sa.get(AGENT_USER) or ""
        if not agent:
            raise KeelClientError(f"run {run_id} is not a Keel run (it has no AgentName)")
        caller = self.as_user
        if caller is not None and not may_see(
            self.policy, caller, owner, sa.get(AGENT_TENANT) or ""
        ):
            raise KeelClientError(f"{caller!r} may not see run {run_id}, so may not fork it")
        step = (await self.status(run_id)).step
        if at_step > step:
            raise KeelClientError(f"run {run_id} has made {step} step(s): fork after 1..{step}")
        user = user or caller or owner
        options = self.start_options(
            agent, message or f"(fork of {run_id} after step {at_step})", user
        )
        if self.policy is not None:
            refused = start_refusal(self.policy, agent, user)
            if refused:
                raise KeelClientError(refused)
            tenant = tenant_of(self.policy, user)
            if tenant:
                pairs = options["search_attributes"].search_attributes
                options["search_attributes"] = TypedSearchAttributes(
                    [*pairs, SearchAttributePair(AGENT_TENANT, tenant)]
                )
        origin = ForkOrigin(run_id=run_id, step=at_step, current_spec=current_spec)
        new_run_id = new_run_id or f"{agent}-{uuid.uuid4().hex[:12]}"
        await self.client.start_workflow(
            desc.workflow_type,
            AgentInput(agent=agent, message=message, user=user, fork=origin),
            id=new_run_id,
            task_queue=desc.task_queue,
            result_type=AgentResult,
            execution_timeout=execution_timeout,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
            memo={FORK_MEMO: origin.model_dump(mode="json")},
            **options,
        )
        return new_run_id

    async def pending(
        self, *, as_user: str | None = None, schemas: bool = False
    ) -> list[PendingApproval]:
        """Every open approval across runs, oldest first; with a caller (`as_user`, default
        the client's), only in the runs they may see. With `schemas`, each carries its tool's
        JSON schema (`parameters`), read from the run's own spec."""
        now = datetime.now(UTC)
        out: list[PendingApproval] = []
        query = f"{KEEL_RUNS} AND ExecutionStatus = 'Running' AND PendingApprovals > 0"
        query += self._visible(as_user)
        async for wf in self.client.list_workflows(query):
            try:
                if not await self.has_worker(wf.id):  # do not wait for an answer that cannot come
                    raise NoWorker("no worker is serving it")
                requests, tools = await self._open_requests(wf.id, schemas)
            except KeelClientError as e:
                n = wf.typed_search_attributes.get(PENDING_APPROVALS) or 0
                out.append(
                    PendingApproval(
                        run_id=wf.id,
                        call_id="",
                        tool="",
                        arguments={},
                        reason=f"{n} approval(s) that cannot be read now: {e}",
                        approvers=[],
                        age_seconds=(now - (wf.start_time or now)).total_seconds(),
                        reachable=False,
                    )
                )
                continue
            for r in requests:
                out.append(
                    PendingApproval(
                        run_id=wf.id,
                        call_id=r.call_id,
                        tool=r.tool,
                        arguments=r.arguments,
                        reason=r.reason,
                        approvers=r.approvers,
                        age_seconds=(now - r.requested_at).total_seconds(),
                        expires_at=r.expires_at,
                        parameters=tools.get(r.tool, {}),
                    )
                )
        return sorted(out, key=lambda p: -p.age_seconds)

    async def _open_requests(
        self, run_id: str, schemas: bool
    ) -> tuple[list[ApprovalRequest], dict[str, dict[str, Any]]]:
        """The run's open approval requests, and with `schemas` its tools' JSON schemas (the
        state's bounded view carries the spec; the status view is smaller)."""
        if not schemas:
            return (await self.status(run_id, timeout=LIST_QUERY_TIMEOUT)).pending_approvals, {}
        try:
            view = await self._handle(run_id).query(
                KeelWorkflow.get_state, rpc_timeout=LIST_QUERY_TIMEOUT
            )
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
            raise await self._query_failed(run_id, e, LIST_QUERY_TIMEOUT) from e
        tools = {t.name: t.parameters for t in view.spec.tools} if view.spec else {}
        return view.pending_approvals, tools

    async def open_approvals(self, *, as_user: str | None = None) -> int:
        """How many approvals are open in the runs the caller may see, as their search
        attributes count them (no worker needed)."""
        query = f"{KEEL_RUNS} AND ExecutionStatus = 'Running' AND PendingApprovals > 0"
        query += self._visible(as_user)
        return sum(
            [
                wf.typed_search_attributes.get(PENDING_APPROVALS) or 0
                async for wf in self.client.list_workflows(query)
            ]
        )


def no_worker(run_id: str, queue: str | None, why: str = "") -> NoWorker:
    """The run cannot be read now: no worker polls its task queue (named when known)."""
    where = f"task queue {queue!r}" if queue else "its task queue"
    because = f" ({why})" if why else ""
    return NoWorker(
        f"run {run_id}: no worker is serving {where}, so its record cannot be read "
        f"now{because}; start a worker for {where}"
    )


def load_approver_key(path: str, source: str = "") -> Ed25519PrivateKey:
    """The approver's signing key in the file at `path` (`~` allowed); a KeelClientError
    that starts with `source` (the flag or variable that named it) when it cannot be used."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return load_signing_key(f.read())
    except (OSError, ValueError) as e:
        raise KeelClientError(f"{source or path}: {e}") from None


def _ending(e: WorkflowFailureError) -> AgentStatus:
    """How a run ended, from its workflow's failure (when its state cannot be read)."""
    if isinstance(e.cause, CancelledError):
        return AgentStatus.CANCELLED
    kind = e.cause.type if isinstance(e.cause, ApplicationError) else ""
    return {
        errors.BUDGET_EXHAUSTED: AgentStatus.BUDGET_EXHAUSTED,
        errors.RUN_CANCELLED: AgentStatus.CANCELLED,
    }.get(kind or "", AgentStatus.FAILED)


def workflow_type(loop: str | type) -> str:
    """The workflow type name of a loop given as a name or a @workflow.defn class."""
    if isinstance(loop, str):
        return loop
    defn = getattr(loop, "__temporal_workflow_definition", None)
    if defn is None or not defn.name:
        raise TypeError(f"{loop!r} is not a @workflow.defn class")
    return str(defn.name)


def _cause(e: BaseException) -> str:
    """The innermost message of a Temporal client error (without a `ValueError: ` prefix)."""
    while getattr(e, "cause", None) is not None:
        e = e.cause  # type: ignore[assignment]
    return e.message if isinstance(e, FailureError) else str(e)
