"""KeelWorkflow: the frame of one run, and the building blocks a loop is made of.

It holds the run's state and spec and binds the run's parts, each holding the invariants of
one part of a run:

- the lifecycle (here): start, budgets and continue-as-new at step boundaries, the ending;
- `ModelCall` (model_call.py): the model's reply, fallbacks, the wait on a provider;
- `ToolStep` (tool_step.py): a step's tool calls, approvals, parking, settling;
- `Inbox` (inbox.py) and `Approvals` (approvals.py): messages and the approval gate;
- `EventLog` (events.py): the run's event stream, for watchers;
- `RunDoors` (doors.py): every query, signal and update a client sends.

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
from collections.abc import Awaitable, Callable
from typing import NoReturn

from temporalio import workflow
from temporalio.exceptions import ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from keel.workflows import errors
    from keel.workflows.approvals import Approvals
    from keel.workflows.archive import RecordArchiver
    from keel.workflows.authz import START_REFUSED, start_refusal
    from keel.workflows.budgets import budget_exhausted, run_usage
    from keel.workflows.compaction import compact
    from keel.workflows.doors import RunDoors
    from keel.workflows.errors import EndRun
    from keel.workflows.events import EventKind, EventLog
    from keel.workflows.fork import begin_fork, load_fork
    from keel.workflows.inbox import Inbox
    from keel.workflows.model_call import ModelCall
    from keel.workflows.models import (
        SIGNAL_SUBAGENT_USAGE,
        TERMINAL_STATUSES,
        AgentInput,
        AgentResult,
        AgentSpec,
        AgentState,
        AgentStatus,
        AuditEntry,
        AuditKind,
        ChatMessage,
        MessagePolicy,
        ModelResult,
        QueuedMessage,
        SubagentUsage,
        ToolSpec,
    )
    from keel.workflows.policy import short_args
    from keel.workflows.steps import (
        MAX_PAYLOAD_BYTES,
        StatusPublisher,
        TaskClock,
        load_spec,
        payload_bytes,
        pin_mcp_tools,
    )
    from keel.workflows.tool_step import ToolStep

EMPTY_REPLY_NUDGE = "Your last reply was empty. Answer the user, or call one of the tools."
ENDINGS_PATCH = "keel-endings-agree"  # runs recorded before it completed on a spent budget
EMPTY_PATCH = "keel-empty-reply"  # runs recorded before it ended a turn on an empty reply
FAILED_STATUS_PATCH = "keel-failed-status"  # runs recorded before every failure upserted it
CANCEL_USAGE_PATCH = "keel-cancel-usage"  # runs recorded before a cancelled child reported
Loop = Callable[[AgentSpec], Awaitable[AgentResult]]


class KeelWorkflow(RunDoors):
    """One agent run's state and building blocks; subclasses add `@workflow.run`."""

    @workflow.init
    def __init__(self, input: AgentInput) -> None:
        self.state = input.carry or AgentState(agent=input.agent, user=input.user)
        self.spec: AgentSpec | None = self.state.spec
        self.inbox = Inbox(self.state)
        self.archiver = RecordArchiver(self.state)  # the record's older part goes to history
        # asked as the history begins (a failure may come right after a local activity's
        # result, where a patch asked then would not line up on replay)
        self._failed_status = workflow.patched(FAILED_STATUS_PATCH)
        self.publisher = StatusPublisher()
        # watchers' view (keel watch); carried again only at continue-as-new
        self.events = EventLog(self.state.events, input.agent, legacy=self.state.stream)
        self.state.events = self.state.stream = None
        self._last_status: AgentStatus | None = self.state.status if input.carry else None
        self.approvals = Approvals(self.state, self.publish, self.events)
        self.clock = TaskClock()
        self.model = ModelCall(self.state, self.events, self.publish, self.fail, self._redo_step)
        self.tools = ToolStep(
            self.state, self.approvals, self.events, self.clock, self.publish, self._carry_over
        )

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
                self.clock.hold()  # before the spec's local activity
                begun = self.clock.now()
                try:
                    self.spec = st.spec = await load_spec(input.agent)
                    # who may start what (a sub-agent's run: its parent's start was checked)
                    refused = start_refusal(self.spec.policy, input.agent, input.user)
                    if refused and workflow.info().parent is None:
                        raise errors.KeelError(refused, type=START_REFUSED)
                    forked = await load_fork(input, self.spec) if input.fork else None
                    keeps_origin = forked is not None and forked.spec is not None
                    if keeps_origin and input.fork is not None and input.fork.current_spec:
                        keeps_origin = False
                    if self.spec.mcp and not keeps_origin:  # listed once, pinned in the snapshot
                        self.spec = st.spec = await pin_mcp_tools(self.spec)
                except errors.KeelError as e:
                    self.finish(AgentStatus.FAILED, e.message)
                    raise
                st.run_key = str(workflow.uuid4())
                st.budget = input.budget  # a sub-agent's: what its parent had left
                st.started_at = begun
                st.transcript = [ChatMessage(role="system", content=self.spec.instructions)]
                st.turn_start = 1
                if forked is not None and input.fork is not None:
                    self.clock.release()  # the origin's state came in a task of its own
                    begin_fork(st, input.fork, forked)
                    if forked.spec is not None and not input.fork.current_spec:
                        self.spec = st.spec = forked.spec
                if input.fork is None or input.message:
                    st.queued_messages.insert(0, _first_message(input))
            assert self.spec is not None
            try:
                result = await loop(self.spec)
            except EndRun as e:
                result = self.finish(e.status, e.reason)
            except ApplicationError as e:  # the run failed (`fail`): watchers are let go first
                if st.status not in TERMINAL_STATUSES and self._failed_status:
                    self.finish(AgentStatus.FAILED, e.message)  # a failure no block recorded
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
            await self._report_to_parent()
            await self._release_watchers()
            raise

    async def _report_to_parent(self) -> None:
        """A cancelled sub-agent tells its parent what it spent, for the parent's budgets:
        a cancellation carries no result the parent could read it from."""
        parent = workflow.info().parent
        if parent is None or not workflow.patched(CANCEL_USAGE_PATCH):
            return
        report = SubagentUsage(run_id=workflow.info().workflow_id, usage=run_usage(self.state))
        try:
            handle = workflow.get_external_workflow_handle(parent.workflow_id)
            await handle.signal(SIGNAL_SUBAGENT_USAGE, report)
        except FailureError:
            pass  # the parent has ended too: there is no budget left to count it in

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
        if self.state.abort:
            raise EndRun(AgentStatus.CANCELLED, self.state.abort)
        spent = budget_exhausted(self.spec, self.state, self.clock.now())
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
        if st.open_step is not None:  # carried into this history, parked on approvals
            carried, st.open_step = st.open_step, None
            await self.tools.resume(spec, carried)
            # its reply's usage was counted in its own history
            return ModelResult(message=st.transcript[-1])
        st.step += 1
        self.publish()
        model = asyncio.create_task(self._ask(spec, tools))
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
        self.clock.release()  # a new task began with the model's reply
        st.usage = st.usage.add(result.usage)
        result.message.step, result.message.usage = st.step, result.usage  # see `keel fork`
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
        await self.tools.run(spec, calls, tools)
        return result

    async def _ask(self, spec: AgentSpec, tools: list[ToolSpec] | None) -> ModelResult:
        """The model's reply, the context compacted first where the agent asks for it."""
        await compact(spec, self.state, self.events)
        return await self.model.ask(spec, tools)

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

    async def _redo_step(self) -> NoReturn:
        """Continue-as-new in the middle of a step none of whose model calls had an answer
        (a long provider outage): the next history takes it again under the same number."""
        await self.continue_as_new(redo_step=True)

    def _carry_over(self) -> NoReturn:
        """Continue-as-new now (no await: nothing can change the state in between)."""
        st = self.state
        self.archiver.sweep()  # e.g. effects, which grow without an audit entry
        st.events = self.events.carry()
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
            usage=run_usage(st),
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
        # the usage rides along, so a parent counts what its sub-agent spent
        raise ApplicationError(
            f"{result.status.value}: {result.error}",
            result.usage,
            type=kind,
            non_retryable=True,
        )

    def fail(self, message: str, type: str) -> NoReturn:
        """The run cannot go on: it ends `failed`, saying what went wrong."""
        result = self.finish(AgentStatus.FAILED, message)
        raise ApplicationError(
            f"step {self.state.step}: {message}", result.usage, type=type, non_retryable=True
        )


def _first_message(input: AgentInput) -> QueuedMessage:
    return QueuedMessage(text=input.message, policy=MessagePolicy.QUEUE, sender=input.user)
