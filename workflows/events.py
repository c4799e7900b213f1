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
from typing import Any

from temporalio import workflow

try:  # tracing is optional (keel[otel]); without it, no spans
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel
except ImportError:  # pragma: no cover
    otel = otel_context = None  # type: ignore[assignment]

from keel.workflows.models import EventKind, EventsCarry, RunEvent
from keel.workflows.stream import PUBLISH_SIGNAL, TOPIC, RunStream

__all__ = ["PUBLISH_SIGNAL", "TOPIC", "EventKind", "EventLog", "RunEvent", "cut"]
RETAINED = 300  # events kept for late watchers (and carried across continue-as-new)
TEXT_CHARS = 300  # an event carries the start of long texts; the transcript has them whole
CARRIED_BYTES = 128_000  # of the retained events, what continue-as-new carries at most


def cut(text: str | None, limit: int = TEXT_CHARS) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more]"


class EventLog:
    """The workflow side: construct from the workflow's `__init__` (the stream registers its
    handlers there), `emit` events, `detach` before the run ends or continues-as-new, and
    carry `state()` into the next history."""

    def __init__(
        self, carried: EventsCarry | None, agent: str, legacy: dict[str, Any] | None = None
    ) -> None:
        self.stream = RunStream(carried, legacy)
        self._agent = agent
        self._asked: dict[str, datetime] = {}  # call id → when its approval was requested
        self._spans: dict[str, Any] = {}  # call id → its approval's open span
        self._context: Any = None  # the run's trace context (`bind_trace`)
        self._meters: tuple[Any, Any, Any] | None = None

    def emit(self, kind: EventKind, **fields: Any) -> None:
        for name in ("text", "arguments", "detail"):
            if name in fields and kind != EventKind.MODEL_DELTA:  # deltas are small already
                fields[name] = cut(fields[name])
        event = RunEvent(kind=kind, at=workflow.now(), **fields)
        if kind in (EventKind.MODEL_REPLY, EventKind.MODEL_DISCARD):
            self.stream.elide(event.step)  # the reply (or nothing) replaces the pieces
        self.stream.publish(event)
        self._measure(event)
        self.stream.truncate(RETAINED)

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
        self.stream.detach()

    def reattach(self) -> None:
        """Take watchers' polls again (the run did not continue-as-new after all)."""
        self.stream.reattach()

    def carry(self) -> EventsCarry:
        """The retained events, for the next history (the newest CARRIED_BYTES of them)."""
        return self.stream.carry(CARRIED_BYTES)
