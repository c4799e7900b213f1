"""A run's whole record, read back: the chunks it archived into its chain of histories
(keel.workflows.archive) joined with the latest entries its state holds."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.workflows.models import (
    ARCHIVE_RECORD,
    AuditEntry,
    DecisionRecord,
    Effect,
    ListArchive,
    RecordChunk,
    RunState,
)

LISTS = ("audit", "effects", "decisions", "retired_call_ids")


class RunRecord(BaseModel):
    """Everything a run recorded, whole and in order (`AgentClient.record`)."""

    run_id: str
    audit: list[AuditEntry] = Field(default_factory=list)
    effects: list[Effect] = Field(default_factory=list)
    decisions: list[DecisionRecord] = Field(default_factory=list)
    retired_call_ids: list[str] = Field(default_factory=list)
    audit_dropped: int = 0  # refusals dropped by runs recorded before the record was archived
    histories: int = 0  # the histories of the run's continue-as-new chain read for it


class RecordGap(Exception):
    """Entries the state no longer holds are not (yet) in the histories read."""


async def archived_chunks(client: Client, workflow_id: str) -> tuple[list[RecordChunk], int]:
    """The record chunks of every history in the run's continue-as-new chain, and how many
    histories that is."""
    desc = await client.get_workflow_handle(workflow_id).describe()
    run: str = desc.raw_description.workflow_execution_info.first_run_id or desc.run_id or ""
    chunks: list[RecordChunk] = []
    histories = 0
    while run:
        histories += 1
        handle = client.get_workflow_handle(workflow_id, run_id=run)
        run = ""
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attrs = event.activity_task_scheduled_event_attributes
                if attrs.activity_type.name == ARCHIVE_RECORD:
                    (chunk,) = await client.data_converter.decode(
                        attrs.input.payloads, [RecordChunk]
                    )
                    chunks.append(chunk)
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                run = (
                    event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                )
    return chunks, histories


def join(run_id: str, state: RunState, chunks: list[RecordChunk], histories: int) -> RunRecord:
    """The whole lists: archived entries by their index, then what the state holds."""
    record = RunRecord(run_id=run_id, audit_dropped=state.audit_dropped, histories=histories)
    for name in LISTS:
        held: list[Any] = getattr(state, name)
        at = getattr(state.archive, name) if state.archive is not None else ListArchive()
        by_index: dict[int, Any] = {}
        for c in chunks:
            if c.list == name:
                for i, e in enumerate(getattr(c, name)):
                    by_index[c.start + i] = e
        for i, e in enumerate(held):
            by_index[at.dropped + i] = e
        total = at.dropped + len(held)
        missing = next((i for i in range(total) if i not in by_index), None)
        if missing is not None:
            raise RecordGap(f"{name} entry {missing} of {total} is in no history read")
        setattr(record, name, [by_index[i] for i in range(total)])
    return record
