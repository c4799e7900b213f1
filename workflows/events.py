"""The run's live event stream: what happens, in order, for watchers (`keel watch`).

Built on Temporal's `temporalio.contrib.workflow_streams`: the workflow keeps an ordered,
offset-addressed log in memory and answers long-poll updates from watchers; a watcher that
connects late reads what it missed from its offset, then follows live, across
continue-as-new. Events are published by workflow code only, so a replay after a worker's
death rebuilds the same log with the same offsets; nothing is written to the history for an
event itself (a watcher's poll records the batch it received). The stream's external
publish signal is refused: no client can slip an event into a run's log.

The log keeps the latest RETAINED events (older ones are dropped, offsets stay global); the
whole conversation is always in the run's transcript (`keel transcript`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from temporalio import workflow

try:  # tracing is optional (keel[otel]); without it, no spans
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel
except ImportError:  # pragma: no cover
    otel = otel_context = None  # type: ignore[assignment]
from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState

TOPIC = "keel.events"
PUBLISH_SIGNAL = "__temporal_workflow_stream_publish"
RETAINED = 300  # events kept for late watchers (and carried across continue-as-new)
TEXT_CHARS = 300  # an event carries the start of long texts; the transcript has them whole


class EventKind(StrEnum):
    STATUS = "status"  # the run's status changed (status, text: the error if any)
    MODEL_REPLY = "model_reply"  # a model step's answer (text, calls, model, tokens)
    TOOL_STARTED = "tool_started"  # a tool call starts running (tool, arguments)
    TOOL_RESULT = "tool_result"  # a tool call's result (text)
    APPROVAL_REQUESTED = "approval_requested"  # (tool, arguments, detail: the reason)
    APPROVAL_DECIDED = "approval_decided"  # (detail: approved/rejected/edited/expired/...)
    MESSAGE = "message"  # a user message arrived (text, detail: how it was handled)
    ENDED = "ended"  # the run ended (status, text: the answer or the error)


class RunEvent(BaseModel):
    """One thing that happened in a run (what a watcher receives)."""

    kind: EventKind
    at: datetime
    step: int = 0
    status: str = ""
    call_id: str = ""
    tool: str = ""
    arguments: str = ""
    text: str = ""
    detail: str = ""
    model: str = ""
    tokens: int = 0
    by: str = ""


def cut(text: str | None, limit: int = TEXT_CHARS) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more]"


class EventLog:
    """The workflow side: construct from the workflow's `__init__` (the stream registers its
    handlers there), `emit` events, `detach` before the run ends or continues-as-new, and
    carry `state()` into the next history."""

    def __init__(self, carried: WorkflowStreamState | None, agent: str) -> None:
        self.stream = WorkflowStream(prior_state=carried)
        self._agent = agent
        self._asked: dict[str, datetime] = {}  # call id → when its approval was requested
        self._spans: dict[str, Any] = {}  # call id → its approval's open span
        self._context: Any = None  # the run's trace context (`bind_trace`)
        self._meters: tuple[Any, Any, Any] | None = None
        self._topic = self.stream.topic(TOPIC, type=RunEvent)
        self._base = carried.base_offset if carried else 0
        self._next = self._base + (len(carried.log) if carried else 0)
        # only the run writes its own log: the publish signal goes to the run's own signal
        # handler, which refuses it (and records that in the audit trail)
        workflow.set_signal_handler(PUBLISH_SIGNAL, None)

    def emit(self, kind: EventKind, **fields: Any) -> None:
        for name in ("text", "arguments", "detail"):
            if name in fields:
                fields[name] = cut(fields[name])
        event = RunEvent(kind=kind, at=workflow.now(), **fields)
        self._topic.publish(event)
        self._measure(event)
        self._next += 1
        if self._next - self._base > RETAINED:
            self._base = self._next - RETAINED
            self.stream.truncate(self._base)

    def _measure(self, e: RunEvent) -> None:
        """Keel's workflow metrics, from the events (`keel.metrics` lists them). Temporal's
        workflow meter skips replays: each is counted once."""
        self._trace(e)
        if e.kind == EventKind.APPROVAL_REQUESTED:
            self._asked[e.call_id] = e.at
            return
        if e.kind not in (EventKind.MODEL_REPLY, EventKind.ENDED, EventKind.APPROVAL_DECIDED):
            return
        if self._meters is None:
            meter = workflow.metric_meter().with_additional_attributes({"agent": self._agent})
            self._meters = (
                meter.create_counter("keel_model_steps", "model steps taken"),
                meter.create_counter("keel_runs_ended", "runs that ended, by status"),
                meter.create_histogram_timedelta(
                    "keel_approval_wait", "from an approval's request to its decision", "ms"
                ),
            )
        steps, ended, waits = self._meters
        if e.kind == EventKind.MODEL_REPLY:
            steps.add(1)
        elif e.kind == EventKind.ENDED:
            ended.add(1, {"status": e.status})
        elif e.call_id in self._asked:
            waited = e.at - self._asked.pop(e.call_id)
            waits.record(waited, {"tool": e.tool, "outcome": e.detail.split(":")[0]})

    def bind_trace(self) -> None:
        """From the run's own code: its trace context, which spans of messages (handled in
        the sender's context) join, linked to the sender's request."""
        if otel_context is not None:
            self._context = otel_context.get_current()

    def _trace(self, e: RunEvent) -> None:
        """Spans of what only the workflow sees, when tracing is on (`KEEL_TRACING`): an
        approval from request to decision (who, outcome), each message (its policy: an
        interrupt shows as one). Model and tool calls are the activities' own spans."""
        if otel is None:
            return
        tracer = otel.get_tracer("keel")
        attrs = {"keel.agent": self._agent, "keel.step": e.step}
        if e.kind == EventKind.APPROVAL_REQUESTED:
            attrs |= {"keel.tool": e.tool, "keel.call_id": e.call_id, "keel.reason": e.detail}
            self._spans[e.call_id] = tracer.start_span(f"approval {e.tool}", attributes=attrs)
        elif e.kind == EventKind.APPROVAL_DECIDED and e.call_id in self._spans:
            span = self._spans.pop(e.call_id)
            span.set_attributes({"keel.outcome": e.detail.split(":")[0], "keel.by": e.by})
            span.end()
        elif e.kind == EventKind.MESSAGE:
            attrs |= {"keel.outcome": e.detail, "keel.sender": e.by}
            sender = otel.get_current_span().get_span_context()
            links = [otel.Link(sender)] if sender.is_valid else None
            span = tracer.start_span("message", self._context, attributes=attrs, links=links)
            span.end()

    def detach(self) -> None:
        """Release the watchers' long polls (they follow on to the next run, or finish)."""
        self.stream.detach_pollers()

    def reattach(self) -> None:
        """Take watchers' polls again (the run did not continue-as-new after all)."""
        self.stream._detaching = False  # the stream has no public way back

    def state(self) -> WorkflowStreamState:
        return self.stream.get_state()
