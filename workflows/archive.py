"""The run's record kept whole while its carried state stays under a fixed size.

A run's audit trail, effects, decisions and retired call ids grow with whatever clients send
(a flood of `keel.resume` signals, refused decisions and messages). Carried whole across
continue-as-new, they would make every new history start with a larger input until one no
longer fits. So once a list's entries not yet archived pass a chunk (CHUNK_ITEMS entries or
CHUNK_BYTES), they move into the history once, as the input of a `keel.archive_record`
activity (which does nothing: its scheduled event is the record; with payload storage the
history keeps a reference to the stored chunk). The state keeps the latest entries of each
list (TAIL_ITEMS, at most TAIL_BYTES beyond the newest) and counts (`RecordArchive`);
`AgentClient.record` reads the chunks back from the run's chain of histories, by index.

The carried part of each list is then at most TAIL_ITEMS + CHUNK_ITEMS entries and about
TAIL_BYTES + CHUNK_BYTES, whatever the run's age. Workflow code only: deterministic.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

from keel.workflows.models import (
    ARCHIVE_RECORD,
    AgentState,
    ListArchive,
    RecordArchive,
    RecordChunk,
)

ARCHIVE_PATCH = "keel-record-archive"  # runs recorded before it carried their lists whole
LISTS = ("audit", "effects", "decisions", "retired_call_ids")
CHUNK_ITEMS = 200  # at most MAX_REFUSALS: a run decides to archive before it drops any
CHUNK_BYTES = 128_000
TAIL_ITEMS = 100  # the latest entries each list keeps in the state (and `get_state` shows)
TAIL_BYTES = 64_000
ARCHIVE_TIMEOUT = timedelta(seconds=30)
ARCHIVE_RETRY = RetryPolicy(maximum_attempts=3)


def size(entry: Any) -> int:
    """An entry's bytes as JSON (what it costs in the carried state)."""
    return len(entry) + 2 if isinstance(entry, str) else len(entry.model_dump_json())


class RecordArchiver:
    """Moves the older part of the run's lists into the history as they grow. `sweep` runs
    after each audit entry and before continue-as-new; a list's entries are archived in
    order, each exactly once, and only what is archived leaves the state."""

    def __init__(self, state: AgentState) -> None:
        self._state = state
        # asked once, as the history begins: asked at the first entry instead (which may come
        # in the activation a local activity's result arrives in, live, but not on replay),
        # the marker would not line up with the replayed commands
        self._legacy = not workflow.patched(ARCHIVE_PATCH)  # recorded before: lists whole
        state._recorded = self.sweep

    def sweep(self) -> None:
        """Archive every list whose unarchived entries pass a chunk; keep the tails."""
        st = self._state
        if st.archive is None:
            if self._legacy or not any(getattr(st, n) for n in LISTS):
                return
            st.archive = RecordArchive()
        for name in LISTS:
            self._sweep(name, getattr(st, name), getattr(st.archive, name))

    def _sweep(self, name: str, entries: list[Any], at: ListArchive) -> None:
        for e in entries[at.measured - at.dropped :]:
            at.pending_bytes += size(e)
        at.measured = at.dropped + len(entries)
        first = at.archived - at.dropped  # the first entry not archived yet
        if len(entries) - first < CHUNK_ITEMS and at.pending_bytes < CHUNK_BYTES:
            return
        chunk: list[Any] = []
        chunk_bytes = 0
        for e in entries[first:]:
            n = size(e)
            if chunk and (len(chunk) >= CHUNK_ITEMS or chunk_bytes + n > CHUNK_BYTES):
                self._emit(name, at, chunk)
                chunk, chunk_bytes = [], 0
            chunk.append(e)
            chunk_bytes += n
        self._emit(name, at, chunk)
        at.pending_bytes = 0
        # every entry is archived now: the state keeps the latest ones only
        keep, kept_bytes = 0, 0
        for e in reversed(entries):
            kept_bytes += size(e)
            if keep >= TAIL_ITEMS or (keep and kept_bytes > TAIL_BYTES):
                break
            keep += 1
        drop = len(entries) - keep
        del entries[:drop]
        at.dropped += drop

    def _emit(self, name: str, at: ListArchive, chunk: list[Any]) -> None:
        """One chunk into the history: the input of an activity that is not waited on (its
        scheduled event holds the chunk, whether or not it runs before the run moves on)."""
        assert self._state.archive is not None
        self._state.archive.chunks += 1
        start = at.archived
        at.archived += len(chunk)
        handle = workflow.start_activity(
            ARCHIVE_RECORD,
            RecordChunk.model_validate({"list": name, "start": start, name: chunk}),
            start_to_close_timeout=ARCHIVE_TIMEOUT,
            retry_policy=ARCHIVE_RETRY,
            summary=f"record: {name} {start}–{at.archived - 1}",
        )
        handle.add_done_callback(_observed)


def _observed(task: asyncio.Future[Any]) -> None:
    """The chunk is in the history once scheduled: how the activity ends does not matter."""
    if not task.cancelled():
        task.exception()
