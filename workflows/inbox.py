"""The message inbox: mid-run user messages and their policies (queue/interrupt/rollback/reject)."""

from __future__ import annotations

from collections.abc import Callable
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
# model request carries, or what the state can carry into a new history, a message is
# refused at the door, rather than accepted and fatal later.
from keel.workflows.views import MAX_CONTEXT_BYTES, message_bytes, utf8_len

INTERRUPTED = "Interrupted by user: this tool call was not run to completion."
ROLLBACK_KINDS = (MessagePolicy.INTERRUPT, MessagePolicy.ROLLBACK)
# a message lives in history and in every later model request; Temporal counts bytes
MAX_MESSAGE_BYTES = 100_000
MAX_MESSAGE_CHARS = MAX_MESSAGE_BYTES  # the name it had when it counted characters
MAX_QUEUED_MESSAGES = 100
MESSAGE_IDS_KEPT = 1000  # ids remembered for deduplication, carried across continue-as-new
AUDIT_TEXT_CHARS = 500
# What the carried state may weigh with a new message in it (Keel's payload limit, less room
# for the events carried beside it and a message's own record); measured only when the
# conversation alone passes MEASURE_FROM, so a small run pays nothing for the check
CARRY_LIMIT_BYTES = 1_800_000 - 200_000
MEASURE_FROM = CARRY_LIMIT_BYTES // 4
# the state's size as Temporal would carry it with this message in it, in bytes
Measure = Callable[[MessageInput], int]


def context_bytes(state: AgentState) -> int:
    """The bytes of the conversation the next model request would carry."""
    return sum(message_bytes(m) for m in state.transcript) + sum(
        utf8_len(q.text) for q in state.queued_messages
    )


context_chars = context_bytes  # the name it had when it counted characters


def message_refusal(
    spec: AgentSpec | None, state: AgentState, m: MessageInput, carried: Measure | None = None
) -> str:
    """Why a message must be refused now ('' when it is accepted). `carried` measures the
    state, with the message in it, as continue-as-new would carry it (a run without payload
    storage must fit)."""
    if m.id and m.id in state.message_ids:
        return ""  # a duplicate is answered, never refused
    if not m.text.strip():
        return "the message is empty"
    size = utf8_len(m.text)
    if size > MAX_MESSAGE_BYTES:
        return f"the message is {size} bytes (UTF-8), over the {MAX_MESSAGE_BYTES}-byte limit"
    if len(state.queued_messages) >= MAX_QUEUED_MESSAGES:
        return f"{MAX_QUEUED_MESSAGES} messages are already queued; send it once they are read"
    stored = spec is not None and spec.payload_storage  # then old turns leave the request
    if not stored:
        conversation = context_bytes(state)
        if conversation + size > MAX_CONTEXT_BYTES:
            return (
                f"the conversation would pass {MAX_CONTEXT_BYTES} bytes, more than one "
                "model request can carry; start a new run"
            )
        if carried is not None and conversation + size > MEASURE_FROM:
            state_bytes = carried(m)
            if state_bytes > CARRY_LIMIT_BYTES:
                return (
                    f"with this message the run's state would be {state_bytes} bytes, over "
                    f"{CARRY_LIMIT_BYTES}: too large to carry into a new history without "
                    "payload storage; start a new run"
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

    def accept(
        self,
        spec: AgentSpec | None,
        m: MessageInput,
        now: datetime,
        carried: Measure | None = None,
    ) -> MessageReceipt:
        """Queue a message (or refuse it), recording either in the audit trail."""
        st = self._state
        policy = effective_policy(spec, m.policy)
        if m.id and m.id in st.message_ids:
            reason = f"message {m.id} was received before"
            st.record(
                AuditEntry(at=now, kind=AuditKind.MESSAGE_DUPLICATE, detail=reason, actor=m.sender)
            )
            return MessageReceipt(status="duplicate", policy=policy, reason=reason)
        refusal = message_refusal(spec, st, m, carried)
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
