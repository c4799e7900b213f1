"""Every door a client knocks on: the queries, signals and updates of a run.

`RunDoors` is the part of `KeelWorkflow` that answers them. It judges nothing itself: a
decision goes to the approval gate (`Approvals`, which asks `decisions.judge`), a message to
the inbox (`inbox.message_refusal` / `Inbox.accept`). Signals never raise: a malformed,
unknown or refused one is recorded in the audit trail. Update validators refuse before
anything reaches the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RawValue

from keel.workflows.approvals import Approvals
from keel.workflows.budgets import count_report
from keel.workflows.events import PUBLISH_SIGNAL, EventKind, EventLog
from keel.workflows.inbox import Inbox, message_refusal
from keel.workflows.model_call import ModelCall
from keel.workflows.models import (
    QUERY_STATE,
    QUERY_STATUS,
    QUERY_TRANSCRIPT,
    SIGNAL_DECIDE,
    SIGNAL_MESSAGE,
    SIGNAL_RESUME,
    SIGNAL_STREAM,
    SIGNAL_SUBAGENT_USAGE,
    UPDATE_DECIDE,
    UPDATE_MESSAGE,
    AgentInput,
    AgentSpec,
    AgentState,
    AuditEntry,
    AuditKind,
    DecideInput,
    DecideReceipt,
    MessageInput,
    MessageReceipt,
    RunState,
    RunStatusView,
    StreamBatch,
    SubagentUsage,
    TranscriptPage,
    TranscriptSlice,
)
from keel.workflows.steps import payload_bytes
from keel.workflows.views import state_view, transcript_slice

M = TypeVar("M", bound=BaseModel)


class RunDoors:
    """The run's queries, signals and updates (a part of `KeelWorkflow`, which sets these)."""

    state: AgentState
    spec: AgentSpec | None
    inbox: Inbox
    approvals: Approvals
    events: EventLog
    model: ModelCall

    @workflow.query(name=QUERY_STATE)
    def get_state(self) -> RunState:
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
            subagents=st.subagents,
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
        """`keel.decide`, `keel.submit_message` and `keel.resume`, as plain JSON a person can
        type. Every payload is taken raw, so a malformed, missing, extra or unknown one is
        recorded as refused in the audit trail, never raised and never dropped silently."""
        if name == SIGNAL_DECIDE:
            d = self._decode(args, DecideInput, name)
            if d is not None:
                self.approvals.decide(self.spec, d)
        elif name == SIGNAL_MESSAGE:
            m = self._decode(args, MessageInput, name)
            if m is not None:
                accepted = self.inbox.accept(self.spec, m, workflow.now(), self._carried_bytes)
                self._message_event(m, accepted)
        elif name == PUBLISH_SIGNAL:
            self._refuse_signal(f"{name}: only the run itself publishes its events")
        elif name == SIGNAL_STREAM:
            batch = self._decode(args, StreamBatch, name)
            if batch is not None:
                self.model.on_stream(batch)
        elif name == SIGNAL_SUBAGENT_USAGE:
            report = self._decode(args, SubagentUsage, name)
            refused = report and count_report(self.state, workflow.info().workflow_id, report)
            if refused:
                self._refuse_signal(f"{name}: {refused}")
        elif name == SIGNAL_RESUME:
            self.model.resume()
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
        refusal = self.approvals.verdict(self.spec, d).refusal
        if refusal:
            raise ValueError(refusal)

    @workflow.update(name=UPDATE_MESSAGE)
    def send_message(self, m: MessageInput) -> MessageReceipt:
        """A user message that answers with a receipt: queued, delivered, or refused."""
        accepted = self.inbox.accept(self.spec, m, workflow.now(), self._carried_bytes)
        return self._message_event(m, accepted)

    @send_message.validator
    def _validate_message(self, m: MessageInput) -> None:
        refusal = message_refusal(self.spec, self.state, m, self._carried_bytes)
        if refusal:
            raise ValueError(refusal)

    def _carried_bytes(self, m: MessageInput) -> int:
        """The state's size as continue-as-new carries it (`KeelWorkflow._carry_over`), with
        `m` in it: a message that would make it too large for a run without payload storage
        is refused here, at the door, instead of failing the run at its next continue-as-new."""
        st = self.state
        carry = AgentInput(agent=st.agent, message="", user=st.user, carry=st)
        return payload_bytes(carry) + payload_bytes(m)

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
