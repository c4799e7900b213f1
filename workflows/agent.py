"""AgentWorkflow: the default agent loop, composed of the building blocks in this package."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RawValue
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from workflows import errors
    from workflows.approvals import ApprovalExpired, Approvals
    from workflows.inbox import INTERRUPTED, Inbox, message_refusal
    from workflows.models import (
        AgentInput,
        AgentResult,
        AgentSpec,
        AgentState,
        AgentStatus,
        ApprovalTimeoutAction,
        AuditEntry,
        ChatMessage,
        DecideInput,
        DecideReceipt,
        Decision,
        Effect,
        MessageInput,
        MessagePolicy,
        MessageReceipt,
        QueuedMessage,
        ToolCall,
    )
    from workflows.policy import approval_reason, budget_exhausted, idempotency_key, parse_arguments
    from workflows.steps import (
        StatusPublisher,
        failure_message,
        failure_type,
        load_spec,
        model_step,
        tool_step,
    )

M = TypeVar("M", bound=BaseModel)


class _CallSlot:
    """One tool call of the step in flight: where it is, and its result once it has one."""

    def __init__(self, call: ToolCall) -> None:
        self.call = call
        self.phase = "pending"  # pending → approval → running → done
        self.result: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.interruptible = True


@workflow.defn
class AgentWorkflow:
    """Runs one agent conversation: model steps, tool steps, approvals, messages, budgets."""

    @workflow.init
    def __init__(self, input: AgentInput) -> None:
        self._state = input.carry or AgentState(agent=input.agent, user=input.user)
        self._spec: AgentSpec | None = self._state.spec
        self._inbox = Inbox(self._state)
        self._publisher = StatusPublisher()
        self._approvals = Approvals(self._state, lambda: self._publisher.publish(self._state))
        self._abort: str | None = None  # an approval expired under the "cancel" policy

    # --- the loop -------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: AgentInput) -> AgentResult:
        st = self._state
        if input.carry is None:
            try:
                self._spec = st.spec = await load_spec(input.agent)
            except errors.KeelError as e:
                self._finish(AgentStatus.FAILED, e.message)
                raise
            st.run_key = str(workflow.uuid4())
            st.started_at = workflow.now()
            st.transcript = [ChatMessage(role="system", content=self._spec.instructions)]
            st.queued_messages.insert(0, _first_message(input))
        try:
            return await self._loop(self._spec)
        except asyncio.CancelledError:
            st.status = AgentStatus.CANCELLED
            st.error = "cancelled"
            st.pending_approvals.clear()
            self._publisher.publish(st)
            raise

    async def _loop(self, spec: AgentSpec) -> AgentResult:
        st = self._state
        while True:
            if self._inbox.stop_turn is not None:
                self._inbox.apply_stop(workflow.now())
            self._inbox.deliver()
            last = st.transcript[-1]
            if last.role == "assistant" and not last.tool_calls:
                st.final_answer = last.content or ""
                if spec.keep_open_seconds <= 0 or not await self._idle(spec):
                    return self._finish(AgentStatus.COMPLETED)
                continue
            if self._abort:
                return self._finish(AgentStatus.CANCELLED, self._abort)
            spent = budget_exhausted(spec, st, workflow.now())
            if spent:
                return self._finish(AgentStatus.BUDGET_EXHAUSTED, spent)
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(AgentInput(agent=st.agent, message="", carry=st))
            st.status = AgentStatus.RUNNING
            await self._step(spec)

    async def _idle(self, spec: AgentSpec) -> bool:
        """Wait for the next message; False when the conversation timed out."""
        st = self._state
        st.status = AgentStatus.IDLE
        self._publisher.publish(st)
        since = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: self._inbox.has_messages,
                timeout=timedelta(seconds=spec.keep_open_seconds),
                timeout_summary="idle: the conversation closes",
            )
        except TimeoutError:
            return False
        st.paused_seconds += (workflow.now() - since).total_seconds()
        st.status = AgentStatus.RUNNING
        return True

    async def _step(self, spec: AgentSpec) -> None:
        """One model call and the tool calls it asks for; stops early on interrupt/rollback."""
        st = self._state
        st.step += 1
        self._publisher.publish(st)
        model = asyncio.create_task(model_step(spec, st))
        await workflow.wait_condition(lambda: model.done() or self._inbox.stop_turn is not None)
        if not model.done():
            model.cancel()
            await asyncio.gather(model, return_exceptions=True)
            return
        try:
            result = model.result()
        except ActivityError as e:
            self._fail(failure_message(e), failure_type(e) or errors.PROVIDER_UNAVAILABLE)
        except errors.KeelError as e:
            self._fail(e.message, e.type or "KeelError")
        st.usage = st.usage.add(result.usage)
        st.transcript.append(result.message)
        self._publisher.publish(st)
        calls = result.message.tool_calls
        if not calls:
            return
        slots = [_CallSlot(c) for c in calls]
        for i, slot in enumerate(slots):
            slot.task = asyncio.create_task(self._call(spec, slot, i))
        await workflow.wait_condition(
            lambda: all(s.phase == "done" for s in slots) or self._inbox.stop_turn is not None
        )
        for slot in slots:
            # interrupted: withdraw approvals, cancel what may be cancelled, let effects finish
            if slot.phase != "done" and (slot.phase != "running" or slot.interruptible):
                assert slot.task is not None
                slot.task.cancel()
        await asyncio.gather(*(s.task for s in slots if s.task), return_exceptions=True)
        for slot in slots:
            st.transcript.append(
                ChatMessage(
                    role="tool",
                    tool_call_id=slot.call.id,
                    name=slot.call.name,
                    content=slot.result if slot.result is not None else INTERRUPTED,
                )
            )
        self._publisher.publish(st)

    async def _call(self, spec: AgentSpec, slot: _CallSlot, index: int) -> None:
        """Policy check → approval gate → the tool activity → the run's record of effects."""
        st = self._state
        call = slot.call
        tool = spec.tool(call.name)
        args, _ = parse_arguments(call.arguments)
        try:
            if tool is not None and args is not None:
                reason = approval_reason(tool, args)
                if reason:
                    slot.phase = "approval"
                    try:
                        d = await self._approvals.request(
                            spec, call.id, tool, args, reason, st.step
                        )
                    except ApprovalExpired:
                        if spec.on_approval_timeout == ApprovalTimeoutAction.CANCEL:
                            self._abort = f"approval for {call.name} ({call.id}) expired"
                        slot.result = f"Rejected: no approval for {call.name} before it expired."
                        return
                    if d.decision == Decision.REJECT:
                        why = d.reason or "no reason given"
                        slot.result = f"Rejected by {d.approver}: {why}"
                        return
                    if d.decision == Decision.EDIT and d.arguments is not None:
                        args = d.arguments
                        call = call.model_copy(update={"arguments": json.dumps(args)})
            slot.phase = "running"
            slot.interruptible = tool.interruptible if tool else True
            key = idempotency_key(st.run_key, st.step, index)
            result = await tool_step(spec, st, call, tool, key)
            slot.result = result.content
            if result.ok and tool is not None and tool.side_effects:
                st.effects.append(
                    Effect(
                        call_id=call.id,
                        tool=call.name,
                        arguments=args or {},
                        idempotency_key=key,
                        result=result.content,
                        step=st.step,
                        at=workflow.now(),
                    )
                )
        finally:
            slot.phase = "done"

    def _finish(self, status: AgentStatus, error: str | None = None) -> AgentResult:
        st = self._state
        st.status = status
        st.error = error
        if error:
            st.audit.append(AuditEntry(at=workflow.now(), kind=status.value, detail=error))
        self._publisher.publish(st)
        return AgentResult(
            status=status,
            final_answer=st.final_answer,
            error=error,
            steps=st.step,
            usage=st.usage,
        )

    def _fail(self, message: str, type: str) -> NoReturn:
        """A model step failed for good: the run ends `failed`, saying what went wrong."""
        self._finish(AgentStatus.FAILED, message)
        raise ApplicationError(
            f"model step {self._state.step} failed: {message}", type=type, non_retryable=True
        )

    # --- queries, signals, updates --------------------------------------------------------

    @workflow.query
    def get_state(self) -> AgentState:
        """Status, step, pending approvals, queued messages, transcript, usage, effects, audit."""
        return self._state

    @workflow.signal(name="decide")
    def decide(self, raw: RawValue) -> None:
        """A decision as plain JSON; bad input is recorded as refused, never raised."""
        d = self._decode(raw, DecideInput, "decide")
        if d is not None:
            self._approvals.decide(self._spec, d)

    @workflow.update(name="decide_approval")
    def decide_approval(self, d: DecideInput) -> DecideReceipt:
        """A decision that answers with a receipt (refusals are raised by the validator)."""
        return self._approvals.decide(self._spec, d)

    @decide_approval.validator
    def _validate_decision(self, d: DecideInput) -> None:
        refusal = self._approvals.refusal(self._spec, d)
        if refusal:
            raise ValueError(refusal)

    @workflow.signal(name="submit_message")
    def submit_message(self, raw: RawValue) -> None:
        """A user message as plain JSON ({"text": ..., "policy": ...}) or a bare string."""
        m = self._decode(raw, MessageInput, "submit_message")
        if m is not None:
            self._inbox.accept(self._spec, m, workflow.now())

    @workflow.update(name="send_message")
    def send_message(self, m: MessageInput) -> MessageReceipt:
        """A user message that answers with a receipt: queued, delivered, or refused."""
        return self._inbox.accept(self._spec, m, workflow.now())

    @send_message.validator
    def _validate_message(self, m: MessageInput) -> None:
        refusal = message_refusal(self._spec, self._state, m)
        if refusal:
            raise ValueError(refusal)

    def _decode(self, raw: RawValue, model: type[M], signal: str) -> M | None:
        """Decode a signal's payload, or record why it was refused."""
        try:
            value = workflow.payload_converter().from_payload(raw.payload)
            if isinstance(value, str) and model is MessageInput:
                value = {"text": value}
            return model.model_validate(value)
        except (ValidationError, ValueError, TypeError) as e:
            self._state.audit.append(
                AuditEntry(
                    at=workflow.now(),
                    kind="signal_refused",
                    detail=f"{signal}: malformed payload: {e}".replace("\n", " ")[:500],
                )
            )
            return None


def _first_message(input: AgentInput) -> QueuedMessage:
    return QueuedMessage(text=input.message, policy=MessagePolicy.QUEUE, sender=input.user)
