"""A run's events as AG-UI events (the `ag-ui-protocol` package's types), for AG-UI clients.

The AG-UI thread and run are both the Keel run. What maps where:

| Keel event | AG-UI events |
|---|---|
| (the stream opens) | RUN_STARTED |
| model_delta (text) | TEXT_MESSAGE_START (first piece of an attempt), TEXT_MESSAGE_CONTENT |
| model_discard | TEXT_MESSAGE_END, then CUSTOM `keel.model_discard` (drop that text) |
| model_reply | TEXT_MESSAGE_END, or START/CONTENT/END when nothing was streamed |
| tool_started | TOOL_CALL_START, TOOL_CALL_ARGS (the call's JSON arguments), TOOL_CALL_END |
| tool_result | TOOL_CALL_RESULT |
| status | STATE_SNAPSHOT `{"status", "step"}` |
| approval_requested/decided, message | CUSTOM `keel.<kind>` with the event |
| ended | RUN_FINISHED (completed; cancelled as its outcome) or RUN_ERROR (failed, budget) |
"""

from __future__ import annotations

import json

from ag_ui.core import (
    BaseEvent,
    CustomEvent,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunStartedEvent,
    StateSnapshotEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)

from keel.workflows.events import EventKind, RunEvent
from keel.workflows.models import AgentStatus

CUSTOM_KINDS = {EventKind.APPROVAL_REQUESTED, EventKind.APPROVAL_DECIDED, EventKind.MESSAGE}


def _ms(e: RunEvent) -> int:
    return int(e.at.timestamp() * 1000)


class AguiMapper:
    """Maps one run's events, in order, to AG-UI events (one mapper per stream)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._open: str | None = None  # the text message being streamed
        self._streamed: set[int] = set()  # steps whose text came in pieces
        # a step's tool calls as they were streamed: index → [name, JSON arguments so far]
        self._calls: dict[int, dict[str, list[str]]] = {}

    def started(self) -> list[BaseEvent]:
        return [RunStartedEvent(thread_id=self.run_id, run_id=self.run_id)]

    def map(self, e: RunEvent) -> list[BaseEvent]:
        """The AG-UI events of one Keel event (none for some)."""
        k, at = e.kind, _ms(e)
        if k == EventKind.MODEL_DELTA:
            return self._delta(e, at)
        if k == EventKind.MODEL_DISCARD:
            self._streamed.discard(e.step)
            self._calls.pop(e.step, None)
            value = {"step": e.step, "detail": e.detail}
            return [*self._close(at), CustomEvent(name="keel.model_discard", value=value)]
        if k == EventKind.MODEL_REPLY:
            if e.step in self._streamed or not e.text:
                return self._close(at)
            mid = f"{self.run_id}:{e.step}"
            return [
                *self._close(at),
                TextMessageStartEvent(message_id=mid, role="assistant", timestamp=at),
                TextMessageContentEvent(message_id=mid, delta=e.text, timestamp=at),
                TextMessageEndEvent(message_id=mid, timestamp=at),
            ]
        if k == EventKind.TOOL_STARTED:
            args = self._arguments(e)
            return [
                *self._close(at),
                ToolCallStartEvent(tool_call_id=e.call_id, tool_call_name=e.tool, timestamp=at),
                ToolCallArgsEvent(tool_call_id=e.call_id, delta=args, timestamp=at),
                ToolCallEndEvent(tool_call_id=e.call_id, timestamp=at),
            ]
        if k == EventKind.TOOL_RESULT:
            return [
                ToolCallResultEvent(
                    message_id=f"{self.run_id}:{e.call_id}:result",
                    tool_call_id=e.call_id,
                    content=e.text,
                    role="tool",
                    timestamp=at,
                )
            ]
        if k == EventKind.STATUS:
            return [StateSnapshotEvent(snapshot={"status": e.status, "step": e.step}, timestamp=at)]
        if k in CUSTOM_KINDS:
            value = e.model_dump(mode="json", exclude_defaults=True)
            return [CustomEvent(name=f"keel.{k.value}", value=value, timestamp=at)]
        if k == EventKind.ENDED:
            return [*self._close(at), self._ended(e, at)]
        return []

    def _delta(self, e: RunEvent, at: int) -> list[BaseEvent]:
        if e.call_id:  # a tool call being formed: kept for its arguments
            call = self._calls.setdefault(e.step, {}).setdefault(e.call_id, ["", ""])
            call[0] = e.tool or call[0]
            call[1] += e.arguments
            return []
        if not e.text:
            return []
        out: list[BaseEvent] = []
        mid = f"{self.run_id}:{e.step}.{e.attempt}"
        if self._open != mid:
            out += self._close(at)
            out.append(TextMessageStartEvent(message_id=mid, role="assistant", timestamp=at))
            self._open = mid
            self._streamed.add(e.step)
        out.append(TextMessageContentEvent(message_id=mid, delta=e.text, timestamp=at))
        return out

    def _arguments(self, e: RunEvent) -> str:
        """The call's JSON arguments as they were streamed (the first unused call of that
        tool in the step); else the event's short form, as a JSON string."""
        for index, (name, args) in sorted(self._calls.get(e.step, {}).items()):
            if name == e.tool and args:
                del self._calls[e.step][index]
                return args
        return json.dumps(e.arguments)

    def _close(self, at: int) -> list[BaseEvent]:
        if self._open is None:
            return []
        mid, self._open = self._open, None
        return [TextMessageEndEvent(message_id=mid, timestamp=at)]

    def _ended(self, e: RunEvent, at: int) -> BaseEvent:
        if e.status == AgentStatus.COMPLETED.value:
            return RunFinishedEvent(
                thread_id=self.run_id, run_id=self.run_id, result=e.text, timestamp=at
            )
        if e.status == AgentStatus.CANCELLED.value:
            return RunFinishedEvent(
                thread_id=self.run_id,
                run_id=self.run_id,
                outcome=RunFinishedCancelledOutcome(),
                timestamp=at,
            )
        return RunErrorEvent(message=e.text or e.status, code=e.status, timestamp=at)
