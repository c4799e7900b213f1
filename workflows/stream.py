"""The one adapter between Keel and `temporalio.contrib.workflow_streams` (experimental).

Everything Keel relies on beyond the SDK's public calls is named here, and
tests/test_stream_adapter.py fails when the SDK changes it:

- `PUBLISH_SIGNAL`: the name of the stream's external publish signal, which Keel refuses
  (only the run writes its own log); the SDK keeps it private.
- `reattach`: the SDK can detach pollers (before continue-as-new) but not take them back
  when the run stays after all; Keel resets the stream's private `_detaching` flag.
- the wire format of `WorkflowStreamState` log items (base64 of a serialized `Payload`),
  read only to take over the state carried by runs recorded before Keel carried its own.

Keel carries its own `EventsCarry` (retained events and their base offset) across
continue-as-new, never the SDK's state, so a new SDK cannot make a carried run unreadable.
"""

from __future__ import annotations

import base64
from typing import Any

from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState
from temporalio.converter import PayloadConverter

from keel.workflows.models import EventKind, EventsCarry, RunEvent

PUBLISH_SIGNAL = "__temporal_workflow_stream_publish"  # the SDK's private _PUBLISH_SIGNAL
TOPIC = "keel.events"


class RunStream:
    """A run's event stream on the SDK's WorkflowStream: publish, truncate, detach and
    reattach watchers' polls, and carry the retained events. Construct it from the
    workflow's `__init__` (the SDK registers its handlers there and checks the caller)."""

    def __init__(self, carried: EventsCarry | None, legacy: dict[str, Any] | None) -> None:
        if carried is None and legacy is not None:
            carried = from_sdk_state(legacy, workflow.payload_converter())
        base = carried.base_offset if carried is not None else 0
        # the SDK's own state only for its base offset; the events are published again, in
        # order, so they keep their offsets
        self._stream = WorkflowStream(prior_state=WorkflowStreamState(base_offset=base))
        self._topic = self._stream.topic(TOPIC, type=RunEvent)
        self.base = base
        self.events: list[RunEvent] = []
        for event in carried.events if carried is not None else []:
            self.publish(event)
        # only the run writes its own log: the publish signal goes to the run's own signal
        # handler, which refuses it (and records that in the audit trail)
        workflow.set_signal_handler(PUBLISH_SIGNAL, None)

    def publish(self, event: RunEvent) -> None:
        self._topic.publish(event)
        self.events.append(event)

    def elide(self, step: int) -> None:
        """Drop the text of this step's deltas from what is carried (their offsets stay; the
        step's reply, or its discard, says what came of them)."""
        for i, e in enumerate(self.events):
            if e.kind == EventKind.MODEL_DELTA and e.step == step and (e.text or e.arguments):
                self.events[i] = e.model_copy(update={"text": "", "arguments": ""})

    def truncate(self, keep: int) -> None:
        """Keep only the latest `keep` events (offsets stay global)."""
        drop = len(self.events) - keep
        if drop > 0:
            self.base += drop
            del self.events[:drop]
            self._stream.truncate(self.base)

    def detach(self) -> None:
        """Release the watchers' long polls (they follow on to the next run, or finish)."""
        self._stream.detach_pollers()

    def reattach(self) -> None:
        """Take watchers' polls again (the run did not continue-as-new after all)."""
        self._stream._detaching = False  # the SDK has no public way back

    def carry(self, max_bytes: int) -> EventsCarry:
        """The retained events, the newest that fit in `max_bytes` (older ones are dropped,
        as `truncate` drops them: offsets stay global)."""
        kept, used = 0, 0
        for e in reversed(self.events):
            used += len(e.model_dump_json())
            if used > max_bytes:
                break
            kept += 1
        events = self.events[len(self.events) - kept :]
        return EventsCarry(base_offset=self.base + len(self.events) - kept, events=events)


def from_sdk_state(state: dict[str, Any], converter: PayloadConverter) -> EventsCarry:
    """The events a run recorded before Keel carried its own, from the SDK's state as JSON."""
    events = []
    for item in state.get("log") or []:
        payload = Payload()
        payload.ParseFromString(base64.b64decode(item["data"]))
        events.append(converter.from_payload(payload, RunEvent))
    return EventsCarry(base_offset=int(state.get("base_offset") or 0), events=events)
