"""The run's archived record: a chunk of it is the input of `keel.archive_record`.

The activity does nothing: scheduling it is what writes the chunk into the run's history
(keel.workflows.archive), where `AgentClient.record` reads it back."""

from __future__ import annotations

from temporalio import activity

from keel.workflows.models import ARCHIVE_RECORD, RecordChunk


@activity.defn(name=ARCHIVE_RECORD)
async def archive_record(chunk: RecordChunk) -> None:
    """Nothing to do: the chunk is in the history already, as this activity's input."""
