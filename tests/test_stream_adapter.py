"""Keel's one adapter over `temporalio.contrib.workflow_streams` (experimental) relies on a few
things the SDK keeps private. Each is checked here, so an SDK upgrade that changes one fails
this file instead of breaking runs in production."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState
from temporalio.contrib.workflow_streams import _stream as sdk_stream
from temporalio.contrib.workflow_streams import _types as sdk_types

from keel.workflows.models import AgentState, EventKind, EventsCarry, RunEvent
from keel.workflows.stream import PUBLISH_SIGNAL, RunStream, from_sdk_state


def test_the_publish_signal_keel_refuses_is_the_sdks() -> None:
    assert PUBLISH_SIGNAL == sdk_stream._PUBLISH_SIGNAL


def test_pollers_are_detached_and_taken_back_through_the_flag_keel_resets() -> None:
    # RunStream.reattach resets `_detaching`: the SDK must set it on detach and read it
    # where polls are refused or released
    assert "_detaching" in WorkflowStream.detach_pollers.__code__.co_names
    readers = [f for f in vars(WorkflowStream).values() if callable(f) and hasattr(f, "__code__")]
    assert any("_detaching" in f.__code__.co_names for f in readers if f.__name__ != "__init__")
    assert "_detaching" in RunStream.reattach.__code__.co_names


def test_a_stream_state_carried_by_an_older_run_is_read_back() -> None:
    """Runs recorded before Keel carried its own EventsCarry hold the SDK's state: Keel
    reads its events back from the SDK's wire format."""
    converter = pydantic_data_converter.payload_converter
    events = [
        RunEvent(kind=EventKind.STATUS, at=datetime(2026, 1, 1, tzinfo=UTC), step=i, text=f"e{i}")
        for i in range(3)
    ]
    wire = [
        sdk_types._WorkflowStreamWireItem(
            topic="keel.events", data=sdk_types._encode_payload(converter.to_payload(e))
        )
        for e in events
    ]
    state = WorkflowStreamState(log=wire, base_offset=40)
    as_json = json.loads(json.dumps(dataclasses.asdict(state), default=str))
    carried = from_sdk_state(as_json, converter)
    assert carried == EventsCarry(base_offset=40, events=events)
    # and an AgentState that carried it decodes (the field is plain JSON now)
    st = AgentState.model_validate({"stream": as_json})
    assert st.stream is not None and from_sdk_state(st.stream, converter).base_offset == 40


def test_keel_carries_its_own_state_not_the_sdks() -> None:
    fields = AgentState.model_fields
    assert fields["events"].annotation == EventsCarry | None
    assert "WorkflowStreamState" not in str(fields["stream"].annotation)
