"""AgentWorkflow: the default agent loop, composed of the building blocks in this package."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RawValue
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

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
    from workflows.policy import (
        approval_reason,
        budget_exhausted,
        idempotency_key,
        parse_arguments,
        validate_arguments,
    )
    from workflows.steps import (
        MAX_PAYLOAD_BYTES,
        StatusPublisher,
        failure_message,
        failure_type,
        load_spec,
        model_step,
        payload_bytes,
        tool_step,
    )

M = TypeVar("M", bound=BaseModel)
EFFECT_RESULT_CHARS = 2000  # the run's record keeps a bounded copy of each effect's result


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
        if input.carry is not None and workflow.info().continued_run_id is None:
            # a carried state (and the spec in it) comes only from continue-as-new
            self._state = AgentState(agent=input.agent, user=input.user)
            self._finish(AgentStatus.FAILED, "`carry` is set by continue-as-new, not by clients")
            raise errors.KeelError("`carry` is set by continue-as-new, not by clients")
        try:
            if input.carry is None:
                try:
                    self._spec = st.spec = await load_spec(input.agent)
                except errors.KeelError as e:
                    self._finish(AgentStatus.FAILED, e.message)
                    raise
                st.run_key = str(workflow.uuid4())
                st.started_at = workflow.now()
                st.transcript = [ChatMessage(role="system", content=self._spec.instructions)]
                st.turn_start = 1
                st.queued_messages.insert(0, _first_message(input))
            assert self._spec is not None
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
                await self._continue_as_new()
            st.status = AgentStatus.RUNNING
            await self._step(spec)

    async def _idle(self, spec: AgentSpec) -> bool:
        """Wait for the next message; False when the conversation timed out."""
        st = self._state
        st.status = AgentStatus.IDLE
        self._publisher.publish(st)
        now = workflow.now()
        if st.idle_since is None:
            st.idle_since = now
        left = spec.keep_open_seconds - (now - st.idle_since).total_seconds()
        try:
            await workflow.wait_condition(
                lambda: self._inbox.has_messages or workflow.info().is_continue_as_new_suggested(),
                timeout=timedelta(seconds=max(left, 0.001)),
                timeout_summary="idle: the conversation closes",
            )
        except TimeoutError:
            # a message that came with the timer in the same task is still delivered
            if not self._inbox.has_messages:
                return False
        if not self._inbox.has_messages:  # refused input filled the history: start afresh
            await self._continue_as_new()  # (idle_since is carried: the window goes on)
        st.paused_seconds += (workflow.now() - st.idle_since).total_seconds()
        st.idle_since = None
        st.status = AgentStatus.RUNNING
        return True

    async def _step(self, spec: AgentSpec) -> None:
        """One model call and the tool calls it asks for; stops early on interrupt/rollback."""
        st = self._state
        st.step += 1
        self._publisher.publish(st)
        model = asyncio.create_task(model_step(spec, st))
        try:
            await workflow.wait_condition(lambda: model.done() or self._inbox.stop_turn is not None)
        except asyncio.CancelledError:
            model.cancel()
            raise
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
        try:
            await workflow.wait_condition(
                lambda: all(s.phase == "done" for s in slots) or self._inbox.stop_turn is not None
            )
        except asyncio.CancelledError:
            # the run is cancelled: stop what may stop, let side effects finish and record them
            await self._settle(slots)
            raise
        await self._settle(slots)

    async def _settle(self, slots: list[_CallSlot]) -> None:
        """Stop the calls still open (withdraw approvals, cancel interruptible tools), wait for
        side-effecting ones to finish, then give every call its result, in call order.

        A cancellation arriving meanwhile is held until every call has its result, so a
        side effect is never cut short and never missing from the record."""
        st = self._state
        tasks = [s.task for s in slots if s.task is not None]
        cancelled = False
        while True:
            for slot in slots:
                if slot.phase != "done" and (slot.phase != "running" or slot.interruptible):
                    assert slot.task is not None
                    slot.task.cancel()
            try:
                await workflow.wait_condition(lambda: all(t.done() for t in tasks))
                break
            except asyncio.CancelledError:
                cancelled = True
        for slot in slots:
            content = slot.result
            if content is None:
                content = INTERRUPTED
                task = slot.task
                error = None if task is None or task.cancelled() else task.exception()
                if error is not None and not _is_cancellation(error):
                    workflow.logger.error(
                        "tool call %s failed inside Keel: %r", slot.call.id, error
                    )
                    content = f"Error: Keel could not run this call: {error}"
            st.transcript.append(
                ChatMessage(
                    role="tool", tool_call_id=slot.call.id, name=slot.call.name, content=content
                )
            )
        self._publisher.publish(st)
        if cancelled:
            raise asyncio.CancelledError()

    async def _call(self, spec: AgentSpec, slot: _CallSlot, index: int) -> None:
        """Policy check → approval gate → the tool activity → the run's record of effects."""
        st = self._state
        call = slot.call
        tool = spec.tool(call.name)
        args, problem = parse_arguments(call.arguments)
        try:
            if tool is None:
                known = ", ".join(t.name for t in spec.tools) or "none"
                slot.result = (
                    f"Error: there is no tool named {call.name!r}. Available tools: {known}."
                )
                return
            if args is None:
                slot.result = f"Error: {problem}"
                return
            problem = validate_arguments(tool, args)
            if problem:
                slot.result = f"Error: invalid arguments for {tool.name}: {problem}"
                return
            edited = ""
            reason = approval_reason(tool, args)
            if reason:
                slot.phase = "approval"
                try:
                    d = await self._approvals.request(spec, call.id, tool, args, reason, st.step)
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
                    # the model must know what actually ran
                    edited = f"Approved by {d.approver} with changed arguments {call.arguments}. "
            slot.phase = "running"
            slot.interruptible = tool.interruptible
            key = idempotency_key(st.run_key, st.step, index)
            result = await tool_step(spec, st, call, tool, key)
            slot.result = edited + result.content
            if result.ok and tool.side_effects:
                st.effects.append(
                    Effect(
                        call_id=call.id,
                        tool=call.name,
                        arguments=args or {},
                        idempotency_key=key,
                        result=result.content[:EFFECT_RESULT_CHARS],
                        step=st.step,
                        at=workflow.now(),
                    )
                )
        finally:
            slot.phase = "done"

    async def _continue_as_new(self) -> NoReturn:
        """Start a fresh history at this step boundary, carrying the whole state."""
        await workflow.wait_condition(workflow.all_handlers_finished)
        st = self._state
        carry = AgentInput(agent=st.agent, message="", user=st.user, carry=st)
        size = payload_bytes(carry)
        if size > MAX_PAYLOAD_BYTES:
            self._fail(
                f"the run's state is {size} bytes, too large to carry into a new history",
                errors.PAYLOAD_TOO_LARGE,
            )
        workflow.continue_as_new(carry)

    def _finish(self, status: AgentStatus, error: str | None = None) -> AgentResult:
        st = self._state
        st.status = status
        st.error = error
        if error:
            st.record(AuditEntry(at=workflow.now(), kind=status.value, detail=error))
        self._publisher.publish(st)
        return AgentResult(
            status=status,
            final_answer=st.final_answer,
            error=error,
            steps=st.step,
            usage=st.usage,
        )

    def _fail(self, message: str, type: str) -> NoReturn:
        """The run cannot go on: it ends `failed`, saying what went wrong."""
        self._finish(AgentStatus.FAILED, message)
        raise ApplicationError(f"step {self._state.step}: {message}", type=type, non_retryable=True)

    # --- queries, signals, updates --------------------------------------------------------

    @workflow.query
    def get_state(self) -> AgentState:
        """Status, step, pending approvals, queued messages, transcript, usage, effects, audit."""
        return self._state

    @workflow.signal(dynamic=True)
    def on_signal(self, name: str, args: Sequence[RawValue]) -> None:
        """`decide` and `submit_message`, as plain JSON a person can type. Every payload is
        taken raw, so a malformed, missing, extra or unknown one is recorded as refused in
        the audit trail, never raised and never dropped silently."""
        if name == "decide":
            d = self._decode(args, DecideInput, name)
            if d is not None:
                self._approvals.decide(self._spec, d)
        elif name == "submit_message":
            m = self._decode(args, MessageInput, name)
            if m is not None:
                self._inbox.accept(self._spec, m, workflow.now())
        else:
            self._refuse_signal(f"unknown signal {name!r} (known: decide, submit_message)")

    @workflow.update(name="decide_approval")
    def decide_approval(self, d: DecideInput) -> DecideReceipt:
        """A decision that answers with a receipt (refusals are raised by the validator)."""
        return self._approvals.decide(self._spec, d)

    @decide_approval.validator
    def _validate_decision(self, d: DecideInput) -> None:
        refusal = self._approvals.refusal(self._spec, d)
        if refusal:
            raise ValueError(refusal)

    @workflow.update(name="send_message")
    def send_message(self, m: MessageInput) -> MessageReceipt:
        """A user message that answers with a receipt: queued, delivered, or refused."""
        return self._inbox.accept(self._spec, m, workflow.now())

    @send_message.validator
    def _validate_message(self, m: MessageInput) -> None:
        refusal = message_refusal(self._spec, self._state, m)
        if refusal:
            raise ValueError(refusal)

    def _decode(self, args: Sequence[RawValue], model: type[M], signal: str) -> M | None:
        """Decode a signal's one payload, or record why it was refused (never raises)."""
        try:
            if len(args) != 1:
                raise ValueError(f"expected one JSON payload, got {len(args)}")
            value = workflow.payload_converter().from_payload(args[0].payload)
            if isinstance(value, str) and model is MessageInput:
                value = {"text": value}
            return model.model_validate(value)
        except Exception as e:
            self._refuse_signal(f"{signal}: malformed payload: {e}")
            return None

    def _refuse_signal(self, why: str) -> None:
        self._state.record(
            AuditEntry(
                at=workflow.now(), kind="signal_refused", detail=why.replace("\n", " ")[:500]
            )
        )


def _is_cancellation(e: BaseException) -> bool:
    return isinstance(e, asyncio.CancelledError) or (
        isinstance(e, ActivityError) and isinstance(e.cause, CancelledError)
    )


def _first_message(input: AgentInput) -> QueuedMessage:
    return QueuedMessage(text=input.message, policy=MessagePolicy.QUEUE, sender=input.user)
