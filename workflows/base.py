"""KeelWorkflow: the building blocks of one run, bound together.

It holds the run's state and spec, the message inbox, the approval gate and status
publication, offers the model step, the tool step (policy check, approval gate, idempotency
key, sub-agents) and budgets as methods, and answers every client door (`keel.decide`,
`keel.submit_message`, `keel.decide_approval`, `keel.send_message`, `keel.get_state`).

A loop subclasses it, defines its own `@workflow.run` and hands its body to `execute`:

    @workflow.defn(name="myteam.PlanAndExecute")
    class PlanAndExecute(KeelWorkflow):
        @workflow.run
        async def run(self, input: AgentInput) -> AgentResult:
            return await self.execute(input, self.plan_and_execute)

The default loop, `AgentWorkflow`, is built exactly this way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import NoReturn, TypeVar

from temporalio import workflow
from temporalio.common import RawValue
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from keel.workflows import errors
    from keel.workflows.approvals import ApprovalExpired, Approvals
    from keel.workflows.authz import START_REFUSED, start_refusal, tool_refusal
    from keel.workflows.events import PUBLISH_SIGNAL, EventKind, EventLog
    from keel.workflows.inbox import INTERRUPTED, Inbox, message_refusal
    from keel.workflows.models import (
        QUERY_STATE,
        QUERY_STATUS,
        QUERY_TRANSCRIPT,
        SIGNAL_DECIDE,
        SIGNAL_MESSAGE,
        SIGNAL_RESUME,
        TERMINAL_STATUSES,
        UPDATE_DECIDE,
        UPDATE_MESSAGE,
        AgentInput,
        AgentResult,
        AgentSpec,
        AgentState,
        AgentStatus,
        ApprovalTimeoutAction,
        AuditEntry,
        AuditKind,
        ChatMessage,
        DecideInput,
        DecideReceipt,
        Decision,
        Effect,
        MessageInput,
        MessagePolicy,
        MessageReceipt,
        ModelResult,
        OpenStep,
        QueuedMessage,
        RunStatusView,
        SubAgentArgs,
        ToolCall,
        ToolSpec,
        TranscriptPage,
        TranscriptSlice,
    )
    from keel.workflows.policy import (
        approval_reason,
        budget_exhausted,
        idempotency_key,
        parse_arguments,
        short_args,
        time_exhausted,
        time_left,
        validate_arguments,
    )
    from keel.workflows.steps import (
        AUTH_RETRY_SECONDS,
        MAX_PAYLOAD_BYTES,
        StatusPublisher,
        failure_message,
        failure_retry_after,
        failure_type,
        load_spec,
        model_step,
        payload_bytes,
        subagent_run_id,
        subagent_step,
        tool_step,
    )
    from keel.workflows.views import state_view, transcript_slice

M = TypeVar("M", bound=BaseModel)
EMPTY_REPLY_NUDGE = "Your last reply was empty. Answer the user, or call one of the tools."
ENDINGS_PATCH = "keel-endings-agree"  # runs recorded before it completed on a spent budget
EMPTY_PATCH = "keel-empty-reply"  # runs recorded before it ended a turn on an empty reply
PARKED_PATCH = "keel-parked-continue"  # runs recorded before a parked step could move on
EFFECT_RESULT_CHARS = 2000  # the run's record keeps a bounded copy of each effect's result
Loop = Callable[[AgentSpec], Awaitable[AgentResult]]


class EndRun(Exception):
    """Raised inside a loop to end the run with this status (a budget is spent, an expired
    approval's policy cancels the run); `execute` turns it into the run's result."""

    def __init__(self, status: AgentStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _CallSlot:
    """One tool call of the step in flight: where it is, and its result once it has one."""

    def __init__(self, call: ToolCall) -> None:
        self.call = call
        self.phase = "pending"  # pending → approval → running → done
        self.result: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.interruptible = True
        self.subagent = False


class KeelWorkflow:
    """One agent run's state and building blocks; subclasses add `@workflow.run`."""

    @workflow.init
    def __init__(self, input: AgentInput) -> None:
        self.state = input.carry or AgentState(agent=input.agent, user=input.user)
        self.spec: AgentSpec | None = self.state.spec
        self.inbox = Inbox(self.state)
        self.publisher = StatusPublisher()
        self.events = EventLog(self.state.stream, input.agent)  # watchers' view (keel watch)
        self.state.stream = None  # carried again only at continue-as-new
        self._last_status: AgentStatus | None = self.state.status if input.carry else None
        self.approvals = Approvals(self.state, self.publish, self.events)
        self._abort: str | None = None  # an approval expired under the "cancel" policy
        self._resume = False  # an operator asked to try the provider again now
        self._stay_parked = False  # replaying a history from before PARKED_PATCH
        # A local activity's result arrives, live, in an activation of its own with a later
        # clock than on replay (where it comes with its task): after one, until the next
        # task begins, budgets read the time the task began, the same both ways.
        self._task_clock: datetime | None = None

    # --- the frame every loop runs in -----------------------------------------------------

    async def execute(self, input: AgentInput, loop: Loop) -> AgentResult:
        """Start (or resume, after continue-as-new) the run, then run `loop` on its spec.

        Keeps the guarantees a loop should not have to know about: a client cannot forge
        the carried state, the spec is loaded once and recorded, the first message is
        queued, `EndRun` becomes the run's status, and a cancellation is recorded."""
        st = self.state
        self.events.bind_trace()
        if input.carry is not None and workflow.info().continued_run_id is None:
            # a carried state (and the spec in it) comes only from continue-as-new
            self.state = AgentState(agent=input.agent, user=input.user)
            self.finish(AgentStatus.FAILED, "`carry` is set by continue-as-new, not by clients")
            raise errors.KeelError("`carry` is set by continue-as-new, not by clients")
        try:
            if input.carry is None:
                begun = self._task_clock = workflow.now()  # before the spec's local activity
                try:
                    self.spec = st.spec = await load_spec(input.agent)
                    # who may start what (a sub-agent's run: its parent's start was checked)
                    refused = start_refusal(self.spec.policy, input.agent, input.user)
                    if refused and workflow.info().parent is None:
                        raise errors.KeelError(refused, type=START_REFUSED)
                except errors.KeelError as e:
                    self.finish(AgentStatus.FAILED, e.message)
                    raise
                st.run_key = str(workflow.uuid4())
                st.started_at = begun
                st.transcript = [ChatMessage(role="system", content=self.spec.instructions)]
                st.turn_start = 1
                st.queued_messages.insert(0, _first_message(input))
            assert self.spec is not None
            try:
                result = await loop(self.spec)
            except EndRun as e:
                result = self.finish(e.status, e.reason)
            except ApplicationError:  # the run failed (`fail`): watchers are let go first
                await self._release_watchers()
                raise
            if self.state.status not in TERMINAL_STATUSES:  # a loop that did not say
                result = self.finish(result.status, result.error)
            await self._release_watchers()
            return self._outcome(result)
        except asyncio.CancelledError:
            st.status = AgentStatus.CANCELLED
            st.error = "cancelled"
            st.pending_approvals.clear()
            self.publish()
            self.events.emit(EventKind.ENDED, status=st.status.value, text="cancelled")
            await self._release_watchers()
            raise

    async def _release_watchers(self) -> None:
        """Before the run ends: watchers' long polls return what they have (a watcher then
        reads the rest from the closed run), so no update is left unanswered."""
        self.events.detach()
        await workflow.wait_condition(workflow.all_handlers_finished)

    def deliver(self) -> None:
        """At a step boundary: finish an interrupt or rollback, then move queued messages
        into the transcript, in arrival order. Not while a carried step waits on approvals:
        its calls' results come first."""
        if self.state.open_step is not None:
            return
        if self.inbox.stop_turn is not None:
            self.inbox.apply_stop(workflow.now())
        self.inbox.deliver()

    async def checkpoint(self) -> None:
        """Before a model step: end the run if a budget is spent or an expired approval
        cancelled it (`EndRun`), and continue-as-new when the server suggests it."""
        assert self.spec is not None
        if self.state.open_step is not None:  # a carried step finishes first
            return
        if self._abort:
            raise EndRun(AgentStatus.CANCELLED, self._abort)
        spent = budget_exhausted(self.spec, self.state, self._task_clock or workflow.now())
        if spent:
            raise EndRun(AgentStatus.BUDGET_EXHAUSTED, spent)
        if workflow.info().is_continue_as_new_suggested():
            await self.continue_as_new()
        if not self.state.provider_error:  # a run still waiting on its provider says so
            self.state.status = AgentStatus.RUNNING

    def answered(self) -> bool:
        """Whether the model's last word is an answer (no tool calls pending on it)."""
        last = self.state.transcript[-1]
        return last.role == "assistant" and not last.tool_calls

    async def turn(self, tools: list[ToolSpec] | None = None) -> str:
        """Steps until the model answers without tools and no message is queued; returns the
        answer. Messages, interrupts, budgets and continue-as-new are handled on the way."""
        while True:
            self.deliver()
            if self.answered():
                self.state.final_answer = self.state.transcript[-1].content or ""
                self.publish(counts=True)
                return self.state.final_answer
            await self.checkpoint()
            await self.step(tools)

    def say(self, text: str) -> None:
        """Add a user message of the loop's own (a plan step, an instruction) to the context;
        after an answer it starts a new turn, which is what a rollback drops."""
        self.inbox.add(text)

    def publish(self, *, counts: bool = False) -> None:
        """Reflect the run's state in its search attributes and current details (steps and
        tokens too when `counts`: at a turn's end), and tell watchers of a new status."""
        st = self.state
        self.publisher.publish(st, counts=counts)
        if st.status != self._last_status:
            self._last_status = st.status
            self.events.emit(
                EventKind.STATUS,
                step=st.step,
                status=st.status.value,
                text=st.provider_error if st.status == AgentStatus.WAITING_PROVIDER else "",
            )

    # --- one step: the model, then the tool calls it asks for -----------------------------

    async def step(self, tools: list[ToolSpec] | None = None) -> ModelResult | None:
        """One model call offering `tools` (default: all the agent's), then the tool calls it
        asks for. None when an interrupt or rollback stopped the step."""
        spec = self.spec
        assert spec is not None
        st = self.state
        if st.open_step is not None:
            return await self._resume_step(spec, st.open_step)
        st.step += 1
        self.publish()
        model = asyncio.create_task(self._ask_model(spec, tools))
        try:
            await workflow.wait_condition(lambda: model.done() or self.inbox.stop_turn is not None)
        except asyncio.CancelledError:
            model.cancel()
            raise
        if not model.done():
            model.cancel()
            await asyncio.gather(model, return_exceptions=True)
            return None
        result = model.result()  # EndRun, or the run's failure, propagate from here
        self._task_clock = None  # a new task began with the model's reply
        st.usage = st.usage.add(result.usage)
        st.transcript.append(result.message)
        calls = result.message.tool_calls
        self.events.emit(
            EventKind.MODEL_REPLY,
            step=st.step,
            text=result.message.content or "",
            detail=", ".join(f"{c.name}({short_args(c.arguments)})" for c in calls),
            model=result.model,
            tokens=result.usage.total_tokens,
        )
        self.publish()
        said = bool(calls or (result.message.content or "").strip())
        if said:
            st.empty_replies = 0
        if not calls:
            if not said and workflow.patched(EMPTY_PATCH):
                if st.empty_replies == 0:
                    st.empty_replies = 1  # one corrective turn, then a clear ending
                    self.say(EMPTY_REPLY_NUDGE)
                else:
                    self.fail("the model answered with nothing, twice in a row", errors.EMPTY_REPLY)
            return result
        offered = spec.tools if tools is None else tools
        slots = [_CallSlot(c) for c in calls]
        for i, slot in enumerate(slots):
            slot.task = asyncio.create_task(self._call(spec, offered, slot, i))
        await self._run_calls(slots, tools)
        return result

    async def _resume_step(self, spec: AgentSpec, carried: OpenStep) -> ModelResult:
        """Take up the tool step carried into this history (it continued-as-new while parked
        on approvals): the calls that had results keep them, the rest wait on their open
        requests (same deadlines) or act on a decision accepted just before. Returns the
        carried reply (its usage was counted in its own history)."""
        st = self.state
        st.open_step = None
        reply = st.transcript[-1]
        offered = spec.tools if carried.offered is None else carried.offered
        self.approvals.resume(carried.decided)
        slots = []
        for i, call in enumerate(reply.tool_calls):
            slot = _CallSlot(call)
            if call.id in carried.results:
                slot.result, slot.phase = carried.results[call.id], "done"
            else:
                slot.task = asyncio.create_task(self._call(spec, offered, slot, i))
            slots.append(slot)
        self.publish()
        await self._run_calls(slots, carried.offered)
        return ModelResult(message=reply)

    async def _run_calls(self, slots: list[_CallSlot], tools: list[ToolSpec] | None) -> None:
        """Wait for the step's calls (or an interrupt), then settle them. While every open
        call waits on a person and the history has grown (refused signals, messages), the
        step moves to a new history, carrying its approvals with their deadlines."""
        while True:
            try:
                await workflow.wait_condition(
                    lambda: (
                        all(s.phase == "done" for s in slots)
                        or self.inbox.stop_turn is not None
                        or self._parked(slots)
                    )
                )
            except asyncio.CancelledError:
                # the run is cancelled: stop what may stop, let side effects finish and record
                await self._settle(slots, cancelled=True)
                raise
            if all(s.phase == "done" for s in slots) or self.inbox.stop_turn is not None:
                break
            if not workflow.patched(PARKED_PATCH):
                self._stay_parked = True  # recorded before: it waited in one history
                continue
            self.events.detach()  # watchers' polls end, so the handlers can finish
            await workflow.wait_condition(workflow.all_handlers_finished)
            if self._parked(slots):  # still (a decision may have come meanwhile)
                self.state.open_step = OpenStep(
                    offered=tools,
                    results={s.call.id: s.result for s in slots if s.result is not None},
                    decided=self.approvals.carry(),
                )
                self._carry_over()
            self.events.reattach()
        await self._settle(slots)

    def _parked(self, slots: list[_CallSlot]) -> bool:
        """Every call is done or waits on a person, at least one waits, and the server
        suggests a new history."""
        if self._stay_parked or not workflow.info().is_continue_as_new_suggested():
            return False
        waiting = [s for s in slots if s.phase != "done"]
        return bool(waiting) and all(
            s.phase == "approval" and self.approvals.undecided(s.call.id) for s in waiting
        )

    async def _ask_model(self, spec: AgentSpec, tools: list[ToolSpec] | None) -> ModelResult:
        """The model's reply for this step. A failure another model could survive (overloaded,
        context too long, model gone) goes to the next of the agent's fallbacks; a provider
        that is down, or a key that was refused, makes the run wait (`waiting_provider`,
        backing off, woken by `keel resume`) for as long as its time budget allows. Only a
        failure of the request itself ends the run."""
        st = self.state
        chain = spec.model.chain()
        backoff = chain[0].retry_initial_seconds
        i = 0
        while True:
            settings = chain[i]
            try:
                result = await model_step(spec, st, tools, settings)
                if st.provider_error or st.status == AgentStatus.WAITING_PROVIDER:
                    st.provider_error = ""
                    st.status = AgentStatus.RUNNING
                    self.publish()
                return result
            except errors.KeelError as e:
                self.fail(e.message, e.type or "KeelError")
            except ActivityError as e:
                if isinstance(e.cause, CancelledError):
                    raise
                kind = failure_type(e) or errors.PROVIDER_UNAVAILABLE
                message = f"{settings.model or 'default model'}: {failure_message(e)}"
                if kind in errors.FALLBACK and i + 1 < len(chain):
                    i += 1
                    st.record(
                        AuditEntry(
                            at=workflow.now(),
                            kind=AuditKind.MODEL_FALLBACK,
                            detail=f"{message}; step {st.step} goes to {chain[i].model}",
                        )
                    )
                    continue
                if kind not in errors.WAIT_AND_RETRY:
                    self.fail(message, kind)
                wait = AUTH_RETRY_SECONDS if kind == errors.PROVIDER_AUTH else backoff
                await self._wait_for_provider(spec, message, max(wait, failure_retry_after(e)))
                backoff = min(backoff * 2, settings.retry_max_seconds)
                i = 0  # after a wait, the agent's own model first

    async def _wait_for_provider(self, spec: AgentSpec, error: str, seconds: float) -> None:
        """Wait (durably) before asking the provider again: the run shows `waiting_provider`
        and the error; `keel resume` cuts the wait short; the time budget ends it."""
        st = self.state
        spent = time_exhausted(spec, st, workflow.now())
        if spent:
            raise EndRun(
                AgentStatus.BUDGET_EXHAUSTED, f"{spent}; the provider kept failing: {error}"
            )
        seconds = max(min(seconds, time_left(spec, st, workflow.now())), 0.001)
        # the status stays waiting_provider until a model call succeeds
        st.status = AgentStatus.WAITING_PROVIDER
        st.provider_error = error
        self.publish()
        try:
            await workflow.wait_condition(
                lambda: self._resume,
                timeout=timedelta(seconds=seconds),
                timeout_summary="the model provider is asked again",
            )
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if st.status == AgentStatus.WAITING_PROVIDER:  # an interrupt ends the wait
                st.status = AgentStatus.RUNNING
            raise
        self._resume = False
        if workflow.info().is_continue_as_new_suggested():
            # a long outage must not grow one history without bound: the step starts again
            # in a fresh history (none of its model calls had an answer)
            await self.continue_as_new(redo_step=True)

    async def _settle(self, slots: list[_CallSlot], cancelled: bool = False) -> None:
        """Stop the calls still open (withdraw approvals, cancel interruptible tools), wait for
        side-effecting ones to finish, then give every call its result, in call order.

        A cancellation arriving meanwhile is held until every call has its result, so a
        side effect is never cut short and never missing from the record. A cancelled run
        cancels its sub-agents' runs too: each lets its own side effects finish."""
        st = self.state
        tasks = [s.task for s in slots if s.task is not None]
        while True:
            for slot in slots:
                stop = (
                    slot.phase != "running" or slot.interruptible or (cancelled and slot.subagent)
                )
                if slot.phase != "done" and stop:
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
            self.events.emit(
                EventKind.TOOL_RESULT,
                step=st.step,
                call_id=slot.call.id,
                tool=slot.call.name,
                text=content,
            )
        self.publish()
        if cancelled:
            raise asyncio.CancelledError()

    async def _call(
        self, spec: AgentSpec, offered: list[ToolSpec], slot: _CallSlot, index: int
    ) -> None:
        """Policy check → approval gate → the tool (or sub-agent) → the record of effects.
        Only the tools this step offered may run."""
        st = self.state
        call = slot.call
        tool = next((t for t in offered if t.name == call.name), None)
        args, problem = parse_arguments(call.arguments)
        try:
            refused = tool_refusal(spec, call.name)
            if refused:  # never scheduled: the model is told, the audit trail keeps it
                slot.result = f"Error: {refused}"
                st.record(
                    AuditEntry(
                        at=workflow.now(),
                        kind=AuditKind.TOOL_REFUSED,
                        detail=refused,
                        call_id=call.id,
                    )
                )
                return
            if tool is None:
                known = ", ".join(t.name for t in offered) or "none in this step"
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
                    d = await self.approvals.request(spec, call.id, tool, args, reason, st.step)
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
            slot.subagent = tool.is_subagent
            key = idempotency_key(st.run_key, st.step, index)
            child = ""
            if tool.local and self._task_clock is None:
                self._task_clock = workflow.now()
            self.events.emit(
                EventKind.TOOL_STARTED,
                step=st.step,
                call_id=call.id,
                tool=call.name,
                arguments=short_args(args or {}),
            )
            if tool.is_subagent:
                task = SubAgentArgs.model_validate(args)
                child = subagent_run_id(tool.agent, key)
                result = await subagent_step(spec, st, tool, task, child)
            else:
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
                        run_id=child,
                    )
                )
        finally:
            slot.phase = "done"

    # --- ending a history, ending a run ---------------------------------------------------

    async def continue_as_new(self, *, redo_step: bool = False) -> NoReturn:
        """Start a fresh history at this step boundary, carrying the whole state (including
        a custom loop's `state.loop_state`). `redo_step`: the step in flight had no answer,
        so the next history takes it again under the same number."""
        self.events.detach()  # watchers follow on to the next history
        await workflow.wait_condition(workflow.all_handlers_finished)
        if redo_step:  # only now, when nothing can interrupt: the number is never reused
            self.state.step -= 1
        self._carry_over()

    def _carry_over(self) -> NoReturn:
        """Continue-as-new now (no await: nothing can change the state in between)."""
        st = self.state
        st.stream = self.events.state()
        carry = AgentInput(agent=st.agent, message="", user=st.user, carry=st)
        stored = self.spec is not None and self.spec.payload_storage
        size = 0 if stored else payload_bytes(carry)  # stored: the history keeps a reference
        if size > MAX_PAYLOAD_BYTES:
            self.fail(
                f"the run's state is {size} bytes, too large to carry into a new history",
                errors.PAYLOAD_TOO_LARGE,
            )
        workflow.continue_as_new(carry)

    def finish(self, status: AgentStatus, error: str | None = None) -> AgentResult:
        """End the run with this status; returns the result the run answers with."""
        st = self.state
        st.status = status
        st.error = error
        if error and status in TERMINAL_STATUSES:
            st.record(AuditEntry(at=workflow.now(), kind=AuditKind(status.value), detail=error))
        self.publish()
        if status in TERMINAL_STATUSES:
            answer = st.final_answer if status == AgentStatus.COMPLETED else error
            self.events.emit(EventKind.ENDED, step=st.step, status=status.value, text=answer or "")
        return AgentResult(
            status=status,
            final_answer=st.final_answer,
            error=error,
            steps=st.step,
            usage=st.usage,
        )

    def _outcome(self, result: AgentResult) -> AgentResult:
        """Temporal's own status agrees with the run's: only a completed run completes; a
        spent budget or an approval's cancel policy fails the workflow with that reason, so
        no such run looks like a success in the Web UI's list."""
        if result.status == AgentStatus.COMPLETED or not workflow.patched(ENDINGS_PATCH):
            return result
        kind = {
            AgentStatus.BUDGET_EXHAUSTED: errors.BUDGET_EXHAUSTED,
            AgentStatus.CANCELLED: errors.RUN_CANCELLED,
        }.get(result.status, "KeelError")
        raise ApplicationError(
            f"{result.status.value}: {result.error}", type=kind, non_retryable=True
        )

    def fail(self, message: str, type: str) -> NoReturn:
        """The run cannot go on: it ends `failed`, saying what went wrong."""
        self.finish(AgentStatus.FAILED, message)
        raise ApplicationError(f"step {self.state.step}: {message}", type=type, non_retryable=True)

    # --- queries, signals, updates --------------------------------------------------------

    @workflow.query(name=QUERY_STATE)
    def get_state(self) -> AgentState:
        """Status, step, pending approvals, queued messages, transcript, usage, effects, audit.

        The answer stays small whatever the run's size (a query's answer is one gRPC message):
        the transcript's tail, with long texts cut. `keel.get_transcript` pages the rest."""
        return state_view(self.state)

    @workflow.query(name=QUERY_STATUS)
    def get_status(self) -> RunStatusView:
        """What lists and waits need (status, step, usage, open approvals), no transcript."""
        st = self.state
        return RunStatusView(
            status=st.status,
            step=st.step,
            usage=st.usage,
            pending_approvals=st.pending_approvals,
            error=st.error,
            keeps_open=None if self.spec is None else self.spec.keep_open_seconds > 0,
        )

    @workflow.query(name=QUERY_TRANSCRIPT)
    def get_transcript(self, page: TranscriptPage) -> TranscriptSlice:
        """The transcript from `page.start`, whole messages, about a megabyte at a time."""
        return transcript_slice(self.state, page.start)

    @workflow.signal(dynamic=True)
    def on_signal(self, name: str, args: Sequence[RawValue]) -> None:
        """`keel.decide` and `keel.submit_message`, as plain JSON a person can type. Every
        payload is taken raw, so a malformed, missing, extra or unknown one is recorded as
        refused in the audit trail, never raised and never dropped silently."""
        if name == SIGNAL_DECIDE:
            d = self._decode(args, DecideInput, name)
            if d is not None:
                self.approvals.decide(self.spec, d)
        elif name == SIGNAL_MESSAGE:
            m = self._decode(args, MessageInput, name)
            if m is not None:
                self._message_event(m, self.inbox.accept(self.spec, m, workflow.now()))
        elif name == PUBLISH_SIGNAL:
            self._refuse_signal(f"{name}: only the run itself publishes its events")
        elif name == SIGNAL_RESUME:
            self._resume = True
            detail = "try the model provider again now"
            self.state.record(AuditEntry(at=workflow.now(), kind=AuditKind.RESUME, detail=detail))
        else:
            self._refuse_signal(
                f"unknown signal {name!r} (known: {SIGNAL_DECIDE}, {SIGNAL_MESSAGE}, "
                f"{SIGNAL_RESUME})"
            )

    @workflow.update(name=UPDATE_DECIDE)
    def decide_approval(self, d: DecideInput) -> DecideReceipt:
        """A decision that answers with a receipt (refusals are raised by the validator)."""
        return self.approvals.decide(self.spec, d)

    @decide_approval.validator
    def _validate_decision(self, d: DecideInput) -> None:
        refusal = self.approvals.refusal(self.spec, d)
        if refusal:
            raise ValueError(refusal)

    @workflow.update(name=UPDATE_MESSAGE)
    def send_message(self, m: MessageInput) -> MessageReceipt:
        """A user message that answers with a receipt: queued, delivered, or refused."""
        return self._message_event(m, self.inbox.accept(self.spec, m, workflow.now()))

    def _message_event(self, m: MessageInput, receipt: MessageReceipt) -> MessageReceipt:
        self.events.emit(
            EventKind.MESSAGE,
            step=self.state.step,
            text=m.text,
            detail=f"{receipt.status} ({receipt.policy.value})"
            + (f": {receipt.reason}" if receipt.reason else ""),
            by=m.sender,
        )
        return receipt

    @send_message.validator
    def _validate_message(self, m: MessageInput) -> None:
        refusal = message_refusal(self.spec, self.state, m)
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
        self.state.record(
            AuditEntry(
                at=workflow.now(),
                kind=AuditKind.SIGNAL_REFUSED,
                detail=why.replace("\n", " ")[:500],
            )
        )


def _is_cancellation(e: BaseException) -> bool:
    return isinstance(e, asyncio.CancelledError) or (
        isinstance(e, ActivityError | ChildWorkflowError) and isinstance(e.cause, CancelledError)
    )


def _first_message(input: AgentInput) -> QueuedMessage:
    return QueuedMessage(text=input.message, policy=MessagePolicy.QUEUE, sender=input.user)
