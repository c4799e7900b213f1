"""The message inbox: mid-run user messages and their policies (queue/interrupt/rollback/reject)."""

from __future__ import annotations

from datetime import datetime

from keel.workflows.models import (
    TERMINAL_STATUSES,
    AgentSpec,
    AgentState,
    AuditEntry,
    AuditKind,
    ChatMessage,
    MessageInput,
    MessagePolicy,
    MessageReceipt,
    QueuedMessage,
)
from keel.workflows.policy import effective_policy, turn_in_flight

# Without payload storage the whole run must fit Temporal's 2 MB payloads: past what one
# model request carries, a message is refused at the door, rather than accepted and fatal.
from keel.workflows.views import MAX_CONTEXT_CHARS

INTERRUPTED = "Interrupted by user: this tool call was not run to completion."
ROLLBACK_KINDS = (MessagePolicy.INTERRUPT, MessagePolicy.ROLLBACK)
MAX_MESSAGE_CHARS = 100_000  # a message lives in history and in every later model request
MAX_QUEUED_MESSAGES = 100
MESSAGE_IDS_KEPT = 1000  # ids remembered for deduplication, carried across continue-as-new
AUDIT_TEXT_CHARS = 500


def context_chars(state: AgentState) -> int:
    """The characters of the conversation the next model request would carry."""
    return sum(len(m.content or "") for m in state.transcript) + sum(
        len(q.text) for q in state.queued_messages
    )


def message_refusal(spec: AgentSpec | None, state: AgentState, m: MessageInput) -> str:
    """Why a message must be refused now ('' when it is accepted)."""
    if m.id and m.id in state.message_ids:
        return ""  # a duplicate is answered, never refused
    if not m.text.strip():
        return "the message is empty"
    if len(m.text) > MAX_MESSAGE_CHARS:
        return f"the message is {len(m.text)} characters, over the {MAX_MESSAGE_CHARS} limit"
    if len(state.queued_messages) >= MAX_QUEUED_MESSAGES:
        return f"{MAX_QUEUED_MESSAGES} messages are already queued; send it once they are read"
    stored = spec is not None and spec.payload_storage  # then old turns leave the request
    if not stored and context_chars(state) + len(m.text) > MAX_CONTEXT_CHARS:
        return (
            f"the conversation would pass {MAX_CONTEXT_CHARS} characters, more than one "
            "model request can carry; start a new run"
        )
    if state.status in TERMINAL_STATUSES:
        return f"the run has ended ({state.status.value})"
    policy = effective_policy(spec, m.policy)
    if policy == MessagePolicy.REJECT and turn_in_flight(state):
        return "a turn is in flight and this message's policy is reject"
    return ""


class Inbox:
    """Accepts messages into the run's queue and tells the loop when a turn must stop."""

    def __init__(self, state: AgentState) -> None:
        self._state = state

    @property
    def stop_turn(self) -> MessagePolicy | None:
        """The interrupt or rollback asked for and not yet done (kept in the run's state)."""
        return self._state.stop_turn

    @stop_turn.setter
    def stop_turn(self, policy: MessagePolicy | None) -> None:
        self._state.stop_turn = policy

    def accept(self, spec: AgentSpec | None, m: MessageInput, now: datetime) -> MessageReceipt:
        """Queue a message (or refuse it), recording either in the audit trail."""
        st = self._state
        policy = effective_policy(spec, m.policy)
        if m.id and m.id in st.message_ids:
            reason = f"message {m.id} was received before"
            st.record(
                AuditEntry(at=now, kind=AuditKind.MESSAGE_DUPLICATE, detail=reason, actor=m.sender)
            )
            return MessageReceipt(status="duplicate", policy=policy, reason=reason)
        refusal = message_refusal(spec, st, m)
        if refusal:
            st.record(
                AuditEntry(at=now, kind=AuditKind.MESSAGE_REJECTED, detail=refusal, actor=m.sender)
            )
            return MessageReceipt(status="rejected", policy=policy, reason=refusal)
        in_flight = turn_in_flight(st)
        if m.id:
            st.message_ids.append(m.id)
            del st.message_ids[:-MESSAGE_IDS_KEPT]
        st.queued_messages.append(
            QueuedMessage(text=m.text, policy=policy, sender=m.sender, received_at=now)
        )
        st.record(
            AuditEntry(
                at=now,
                kind=AuditKind.MESSAGE,
                detail=f"{policy.value}: {m.text[:AUDIT_TEXT_CHARS]}",
                actor=m.sender,
            )
        )
        if not in_flight:
            return MessageReceipt(status="delivered", policy=policy, reason="starts the next turn")
        if spec is None:  # the run is still starting: there is no turn to stop yet
            return MessageReceipt(status="queued", policy=policy, reason="joins the first turn")
        if policy in ROLLBACK_KINDS:
            # rollback is the stronger request: it wins over an interrupt already asked for
            if self.stop_turn != MessagePolicy.ROLLBACK:
                self.stop_turn = policy
            return MessageReceipt(
                status="queued", policy=policy, reason="the turn in flight is being stopped"
            )
        return MessageReceipt(status="queued", policy=policy, reason="at the next step boundary")

    @property
    def has_messages(self) -> bool:
        return bool(self._state.queued_messages)

    def apply_stop(self, now: datetime) -> None:
        """After the turn stopped: drop it from the model's context if a rollback was asked."""
        st = self._state
        if self.stop_turn == MessagePolicy.ROLLBACK:
            start = max(st.turn_start, 1)  # the instructions are never rolled back
            dropped = len(st.transcript) - start
            # the dropped turn's call ids are never handed out again
            st.retired_call_ids += [c.id for m in st.transcript[start:] for c in m.tool_calls]
            del st.transcript[start:]
            st.record(
                AuditEntry(
                    at=now,
                    kind=AuditKind.ROLLED_BACK,
                    detail=f"dropped {dropped} messages of turn {st.turn}; effects stay recorded",
                )
            )
        elif self.stop_turn == MessagePolicy.INTERRUPT:
            st.record(AuditEntry(at=now, kind=AuditKind.INTERRUPTED, detail=f"turn {st.turn}"))
        self.stop_turn = None

    def deliver(self) -> int:
        """Move queued messages into the transcript, in arrival order; returns how many."""
        st = self._state
        if not st.queued_messages:
            return 0
        for q in st.queued_messages:
            self.add(q.text)
        n = len(st.queued_messages)
        st.queued_messages.clear()
        return n

    def add(self, text: str) -> None:
        """Append a user message; after an answer (or at the start) it opens a new turn."""
        st = self._state
        last = st.transcript[-1] if st.transcript else None
        if (
            last is None
            or last.role == "system"
            or (last.role == "assistant" and not last.tool_calls)
        ):
            st.turn += 1
            st.turn_start = len(st.transcript)
        st.transcript.append(ChatMessage(role="user", content=text))
