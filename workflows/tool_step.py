"""The tool calls of one model step: each call's policy check, approval gate, idempotency key
and execution (a tool or a sub-agent), the step parked on approvals across continue-as-new,
and settling (every call gets its result, in call order, whatever stopped the step)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from enum import StrEnum
from typing import NoReturn

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError, ChildWorkflowError

from keel.workflows.approvals import ApprovalExpired, Approvals
from keel.workflows.authz import tool_refusal
from keel.workflows.events import EventKind, EventLog
from keel.workflows.inbox import INTERRUPTED
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    ApprovalTimeoutAction,
    AuditEntry,
    AuditKind,
    ChatMessage,
    Decision,
    Effect,
    OpenStep,
    SubAgentArgs,
    ToolCall,
    ToolSpec,
)
from keel.workflows.policy import (
    approval_reason,
    idempotency_key,
    parse_arguments,
    short_args,
    validate_arguments,
)
from keel.workflows.steps import TaskClock, subagent_run_id, subagent_step, tool_step

PARKED_PATCH = "keel-parked-continue"  # runs recorded before it: a parked step stayed put
SAFE_KEY_PATCH = "keel-safe-keys"  # runs recorded before it: keys `<run key>:<step>:<index>`
EFFECT_RESULT_CHARS = 2000  # the run's record keeps a bounded copy of each effect's result


class CallPhase(StrEnum):
    """Where a tool call of the step in flight is."""

    PENDING = "pending"  # being checked (policy, arguments)
    APPROVAL = "approval"  # waiting on a person
    RUNNING = "running"  # the tool (or sub-agent) runs
    DONE = "done"  # it has its result (or never will run)


class CallSlot:
    """One tool call of the step in flight: where it is, and its result once it has one."""

    def __init__(self, call: ToolCall) -> None:
        self.call = call
        self.phase = CallPhase.PENDING
        self.result: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.interruptible = True
        self.subagent = False


class ToolStep:
    """Runs the tool calls a model reply asks for, one task per call, until every call has
    its result or the turn is stopped (interrupt, rollback, cancellation)."""

    def __init__(
        self,
        state: AgentState,
        approvals: Approvals,
        events: EventLog,
        clock: TaskClock,
        publish: Callable[[], None],
        carry_over: Callable[[], NoReturn],
    ) -> None:
        self._state = state
        self._approvals = approvals
        self._events = events
        self._clock = clock
        self._publish = publish
        self._carry_over = carry_over  # continue-as-new now, carrying `state.open_step`
        self._stay_parked = False  # replaying a history from before PARKED_PATCH

    async def run(
        self, spec: AgentSpec, calls: list[ToolCall], tools: list[ToolSpec] | None
    ) -> None:
        """Run the calls of this step's reply, offering only `tools` (None: all the agent's)."""
        offered = spec.tools if tools is None else tools
        slots = [CallSlot(c) for c in calls]
        for i, slot in enumerate(slots):
            slot.task = asyncio.create_task(self._call(spec, offered, slot, i))
        await self._run_calls(slots, tools)

    async def resume(self, spec: AgentSpec, carried: OpenStep) -> None:
        """Take up the step carried into this history (it continued-as-new while parked on
        approvals): the calls that had results keep them, the rest wait on their open
        requests (same deadlines) or act on a decision accepted just before."""
        reply = self._state.transcript[-1]
        offered = spec.tools if carried.offered is None else carried.offered
        self._approvals.resume(carried.decided)
        slots = []
        for i, call in enumerate(reply.tool_calls):
            slot = CallSlot(call)
            if call.id in carried.results:
                slot.result, slot.phase = carried.results[call.id], CallPhase.DONE
            else:
                slot.task = asyncio.create_task(self._call(spec, offered, slot, i))
            slots.append(slot)
        self._publish()
        await self._run_calls(slots, carried.offered)

    async def _run_calls(self, slots: list[CallSlot], tools: list[ToolSpec] | None) -> None:
        """Wait for the step's calls (or an interrupt), then settle them. While every open
        call waits on a person and the history has grown (refused signals, messages), the
        step moves to a new history, carrying its approvals with their deadlines."""
        st = self._state
        while True:
            try:
                await workflow.wait_condition(
                    lambda: _all_done(slots) or st.stop_turn is not None or self._parked(slots)
                )
            except asyncio.CancelledError:
                # the run is cancelled: stop what may stop, let side effects finish and record
                await self._settle(slots, cancelled=True)
                raise
            if _all_done(slots) or st.stop_turn is not None:
                break
            if not workflow.patched(PARKED_PATCH):
                self._stay_parked = True  # recorded before: it waited in one history
                continue
            self._events.detach()  # watchers' polls end, so the handlers can finish
            await workflow.wait_condition(workflow.all_handlers_finished)
            if self._parked(slots):  # still (a decision may have come meanwhile)
                st.open_step = OpenStep(
                    offered=tools,
                    results={s.call.id: s.result for s in slots if s.result is not None},
                    decided=self._approvals.carry(),
                )
                self._carry_over()
            self._events.reattach()
        await self._settle(slots)

    def _parked(self, slots: list[CallSlot]) -> bool:
        """Every call is done or waits on a person, at least one waits, and the server
        suggests a new history."""
        if self._stay_parked or not workflow.info().is_continue_as_new_suggested():
            return False
        waiting = [s for s in slots if s.phase != CallPhase.DONE]
        return bool(waiting) and all(
            s.phase == CallPhase.APPROVAL and self._approvals.undecided(s.call.id) for s in waiting
        )

    async def _settle(self, slots: list[CallSlot], cancelled: bool = False) -> None:
        """Stop the calls still open (withdraw approvals, cancel interruptible tools), wait for
        side-effecting ones to finish, then give every call its result, in call order.

        A cancellation arriving meanwhile is held until every call has its result, so a
        side effect is never cut short and never missing from the record. A cancelled run
        cancels its sub-agents' runs too: each lets its own side effects finish."""
        st = self._state
        tasks = [s.task for s in slots if s.task is not None]
        while True:
            for slot in slots:
                stop = (
                    slot.phase != CallPhase.RUNNING
                    or slot.interruptible
                    or (cancelled and slot.subagent)
                )
                if slot.phase != CallPhase.DONE and stop:
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
            self._events.emit(
                EventKind.TOOL_RESULT,
                step=st.step,
                call_id=slot.call.id,
                tool=slot.call.name,
                text=content,
            )
        self._publish()
        if cancelled:
            raise asyncio.CancelledError()

    async def _call(
        self, spec: AgentSpec, offered: list[ToolSpec], slot: CallSlot, index: int
    ) -> None:
        """Policy check → approval gate → the tool (or sub-agent) → the record of effects.
        Only the tools this step offered may run."""
        try:
            slot.result = await self._check_and_run(spec, offered, slot, index)
        finally:
            slot.phase = CallPhase.DONE

    async def _check_and_run(
        self, spec: AgentSpec, offered: list[ToolSpec], slot: CallSlot, index: int
    ) -> str:
        """The call's result: what ran, or why it did not."""
        st = self._state
        call = slot.call
        refused = tool_refusal(spec, call.name)
        if refused:  # never scheduled: the model is told, the audit trail keeps it
            st.record(
                AuditEntry(
                    at=workflow.now(), kind=AuditKind.TOOL_REFUSED, detail=refused, call_id=call.id
                )
            )
            return f"Error: {refused}"
        tool = next((t for t in offered if t.name == call.name), None)
        if tool is None:
            known = ", ".join(t.name for t in offered) or "none in this step"
            return f"Error: there is no tool named {call.name!r}. Available tools: {known}."
        args, problem = parse_arguments(call.arguments)
        if args is None:
            return f"Error: {problem}"
        problem = validate_arguments(tool, args)
        if problem:
            return f"Error: invalid arguments for {tool.name}: {problem}"
        edited = ""
        reason = approval_reason(tool, args)
        if reason:
            slot.phase = CallPhase.APPROVAL
            try:
                d = await self._approvals.request(spec, call.id, tool, args, reason, st.step)
            except ApprovalExpired:
                if spec.on_approval_timeout == ApprovalTimeoutAction.CANCEL:
                    st.abort = f"approval for {call.name} ({call.id}) expired"
                return f"Rejected: no approval for {call.name} before it expired."
            if d.decision == Decision.REJECT:
                return f"Rejected by {d.approver}: {d.reason or 'no reason given'}"
            if d.decision == Decision.EDIT and d.arguments is not None:
                args = d.arguments
                call = call.model_copy(update={"arguments": json.dumps(args)})
                # the model must know what actually ran
                edited = f"Approved by {d.approver} with changed arguments {call.arguments}. "
        slot.phase = CallPhase.RUNNING
        slot.interruptible = tool.interruptible
        slot.subagent = tool.is_subagent
        safe = workflow.patched(SAFE_KEY_PATCH)
        key = idempotency_key(st.run_key, st.step, index, safe=safe)
        if tool.local:
            self._clock.hold()
        self._events.emit(
            EventKind.TOOL_STARTED,
            step=st.step,
            call_id=call.id,
            tool=call.name,
            arguments=short_args(args),
        )
        child = ""
        if tool.is_subagent:
            task = SubAgentArgs.model_validate(args)
            child = subagent_run_id(tool.agent, st.run_key, st.step, index)
            result = await subagent_step(spec, st, tool, task, child)
        else:
            result = await tool_step(spec, st, call, tool, key)
        if result.ok and tool.side_effects:
            st.effects.append(
                Effect(
                    call_id=call.id,
                    tool=call.name,
                    arguments=args,
                    idempotency_key=key,
                    result=result.content[:EFFECT_RESULT_CHARS],
                    step=st.step,
                    at=workflow.now(),
                    run_id=child,
                )
            )
        return edited + result.content


def _all_done(slots: list[CallSlot]) -> bool:
    return all(s.phase == CallPhase.DONE for s in slots)


def _is_cancellation(e: BaseException) -> bool:
    return isinstance(e, asyncio.CancelledError) or (
        isinstance(e, ActivityError | ChildWorkflowError) and isinstance(e.cause, CancelledError)
    )
