"""AgentClient: start runs, watch them, approve, message and cancel them from Python."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.service import RPCError, RPCStatusCode

from keel.config import Settings, connect
from keel.workflows import errors
from keel.workflows.base import KeelWorkflow
from keel.workflows.models import (
    AGENT_NAME,
    AGENT_STATUS,
    AGENT_STEPS,
    AGENT_USER,
    SIGNAL_RESUME,
    TERMINAL_STATUSES,
    TOTAL_TOKENS,
    WORKFLOW_TYPE,
    AgentInput,
    AgentResult,
    AgentState,
    AgentStatus,
    DecideInput,
    DecideReceipt,
    Decision,
    MessageInput,
    MessagePolicy,
    MessageReceipt,
    Usage,
)

POLL_EVERY = 0.25
# Every Keel run, whatever its loop, carries AgentName from its start.
KEEL_RUNS = "AgentName IS NOT NULL"


class KeelClientError(Exception):
    """A request Keel refused, with the reason the run gave."""


class RunSummary(BaseModel):
    run_id: str
    agent: str = ""
    status: str = ""
    user: str = ""
    steps: int = 0
    tokens: int = 0
    started: datetime | None = None


class PendingApproval(BaseModel):
    run_id: str
    call_id: str
    tool: str
    arguments: dict[str, Any]
    reason: str
    approvers: list[str]
    age_seconds: float
    expires_at: datetime


class AgentClient:
    """The Python API over Keel runs, whatever loop they run. A run's id is its Temporal
    workflow id. `client` must use Keel's data converter (KeelPlugin or keel.connect)."""

    def __init__(
        self, client: Client, settings: Settings | None = None, *, task_queue: str | None = None
    ) -> None:
        self.client = client
        self.settings = settings or Settings.from_env()
        self.task_queue = task_queue or self.settings.task_queue

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
    ) -> str:
        """Start a run of `agent` on `message`; returns the run id. `loop` is the workflow
        that runs it: Keel's default loop, or a KeelWorkflow of your own (class or type name)."""
        run_id = run_id or f"{agent}-{uuid.uuid4().hex[:12]}"
        await self.client.start_workflow(
            _workflow_type(loop),
            AgentInput(agent=agent, message=message, user=user),
            id=run_id,
            task_queue=self.task_queue,
            result_type=AgentResult,
            execution_timeout=execution_timeout,
            static_summary=f"{agent} for {user or 'anyone'}: {message[:120]}",
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(AGENT_NAME, agent),
                    SearchAttributePair(AGENT_USER, user),
                    SearchAttributePair(AGENT_STATUS, AgentStatus.RUNNING.value),
                ]
            ),
        )
        return run_id

    async def get_state(self, run_id: str) -> AgentState:
        """The run's state: status, step, transcript, usage, approvals, effects, audit."""
        return await self._handle(run_id).query(KeelWorkflow.get_state)

    async def result(self, run_id: str, timeout: float | None = None) -> AgentResult:
        """Wait for the run's latest answer: when it ends, or goes idle after a turn."""
        handle = self._handle(run_id)

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
                    usage=state.usage if state else Usage(),
                )

        async def idle() -> AgentResult:
            while True:
                state = await self._state_or_none(run_id)
                if state is not None and state.status == AgentStatus.IDLE:
                    return AgentResult(
                        status=state.status,
                        final_answer=state.final_answer,
                        steps=state.step,
                        usage=state.usage,
                    )
                await asyncio.sleep(POLL_EVERY)

        waits = [asyncio.create_task(ended()), asyncio.create_task(idle())]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
            if not done:
                raise TimeoutError(f"run {run_id} gave no answer within {timeout} s")
            return done.pop().result()
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _state_or_none(self, run_id: str) -> AgentState | None:
        try:
            return await self.get_state(run_id)
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
            return None

    async def list(self, status: str | None = None, limit: int = 100) -> list[RunSummary]:
        """Recent runs, newest first, optionally only those with this AgentStatus."""
        query = KEEL_RUNS
        if status:
            query += f" AND AgentStatus = '{AgentStatus(status).value}'"
        out: list[RunSummary] = []
        async for wf in self.client.list_workflows(query, limit=limit):
            sa = wf.typed_search_attributes
            out.append(
                RunSummary(
                    run_id=wf.id,
                    agent=sa.get(AGENT_NAME) or "",
                    status=sa.get(AGENT_STATUS) or "",
                    user=sa.get(AGENT_USER) or "",
                    steps=sa.get(AGENT_STEPS) or 0,
                    tokens=sa.get(TOTAL_TOKENS) or 0,
                    started=wf.start_time,
                )
            )
        return out

    async def approve(
        self, run_id: str, call_id: str, approver: str, edit: dict[str, Any] | None = None
    ) -> DecideReceipt:
        """Approve a pending tool call, optionally with changed arguments."""
        decision = Decision.EDIT if edit is not None else Decision.APPROVE
        return await self.decide(
            run_id,
            DecideInput(call_id=call_id, decision=decision, approver=approver, arguments=edit),
        )

    async def reject(self, run_id: str, call_id: str, approver: str, reason: str) -> DecideReceipt:
        """Reject a pending tool call; the model sees the reason as the tool's result."""
        return await self.decide(
            run_id,
            DecideInput(
                call_id=call_id, decision=Decision.REJECT, approver=approver, reason=reason
            ),
        )

    async def decide(self, run_id: str, decision: DecideInput) -> DecideReceipt:
        """Send a decision through the `decide_approval` update; a refusal raises."""
        try:
            return await self._handle(run_id).execute_update(KeelWorkflow.decide_approval, decision)
        except WorkflowUpdateFailedError as e:
            raise KeelClientError(_cause(e)) from e
        except RPCError as e:
            raise KeelClientError(f"run {run_id}: {e.message}") from e

    async def send_message(
        self, run_id: str, text: str, policy: MessagePolicy | str | None = None, sender: str = ""
    ) -> MessageReceipt:
        """Send a message mid-run; the receipt says queued, delivered or why it was refused."""
        m = MessageInput(text=text, policy=MessagePolicy(policy) if policy else None, sender=sender)
        try:
            return await self._handle(run_id).execute_update(KeelWorkflow.send_message, m)
        except WorkflowUpdateFailedError as e:
            return MessageReceipt(
                status="rejected", policy=m.policy or MessagePolicy.QUEUE, reason=_cause(e)
            )
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise  # the outcome is unknown (e.g. a timeout): do not report a refusal
            return MessageReceipt(
                status="rejected",
                policy=m.policy or MessagePolicy.QUEUE,
                reason=f"run {run_id}: {e.message}",
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

    async def pending(self) -> list[PendingApproval]:
        """Every open approval across runs, oldest first."""
        now = datetime.now(UTC)
        out: list[PendingApproval] = []
        query = f"{KEEL_RUNS} AND ExecutionStatus = 'Running' AND PendingApprovals > 0"
        async for wf in self.client.list_workflows(query):
            state = await self._state_or_none(wf.id)
            for r in state.pending_approvals if state else []:
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
                    )
                )
        return sorted(out, key=lambda p: -p.age_seconds)


def _ending(e: WorkflowFailureError) -> AgentStatus:
    """How a run ended, from its workflow's failure (when its state cannot be read)."""
    if isinstance(e.cause, CancelledError):
        return AgentStatus.CANCELLED
    kind = e.cause.type if isinstance(e.cause, ApplicationError) else ""
    return {
        errors.BUDGET_EXHAUSTED: AgentStatus.BUDGET_EXHAUSTED,
        errors.RUN_CANCELLED: AgentStatus.CANCELLED,
    }.get(kind or "", AgentStatus.FAILED)


def _workflow_type(loop: str | type) -> str:
    if isinstance(loop, str):
        return loop
    defn = getattr(loop, "__temporal_workflow_definition", None)
    if defn is None or not defn.name:
        raise TypeError(f"{loop!r} is not a @workflow.defn class")
    return str(defn.name)


def _cause(e: BaseException) -> str:
    """The innermost message of a Temporal client error."""
    while getattr(e, "cause", None) is not None:
        e = e.cause  # type: ignore[assignment]
    return str(e)
