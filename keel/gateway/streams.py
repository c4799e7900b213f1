"""Server-Sent Events (sse-starlette): a run's events, the same as AG-UI events, and the
caller's runs as they change.

Each event of a run carries its offset as its SSE id, so a client that reconnects with
`Last-Event-ID` (browsers' EventSource do it by themselves) continues after the last one it
got, from AgentClient.events: nothing twice, nothing missed (within the latest 300 events a
run keeps for late watchers). A comment every 15 s keeps proxies from closing a quiet stream.
An error once the stream is under way arrives as an `error` event holding the problem.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ag_ui.encoder import EventEncoder
from sse_starlette import EventSourceResponse

from keel.client.api import AgentClient
from keel.gateway.agui import AguiMapper
from keel.gateway.problems import body, from_error
from keel.workflows.models import RunEvent

KEEP_ALIVE_SECONDS = 15
SEP = "\n"
RUNS_EVERY = 2.0  # seconds between looks at the caller's runs (/api/events)


def sse(events: AsyncIterator[Any]) -> EventSourceResponse:
    """A text/event-stream response of `events` (dicts of data/event/id, or ready bytes)."""
    return EventSourceResponse(
        events,
        ping=KEEP_ALIVE_SECONDS,
        sep=SEP,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _error(e: Exception, path: str) -> dict[str, str]:
    p = from_error(e)
    doc = body(p.status, p.detail, path, p.slug) if p else body(500, "internal error", path)
    return {"event": "error", "data": json.dumps(doc)}


async def run_events(
    events: AsyncIterator[tuple[int, RunEvent]], path: str
) -> AsyncIterator[dict[str, str]]:
    """A run's events (from `RunFeeds.follow`), until it ends."""
    try:
        async for offset, event in events:
            yield {"id": str(offset), "event": event.kind.value, "data": event.model_dump_json()}
    except Exception as e:  # the stream is under way: the client gets the problem as an event
        yield _error(e, path)


async def agui_events(
    events: AsyncIterator[tuple[int, RunEvent]], run_id: str, path: str
) -> AsyncIterator[bytes]:
    """The run's events as AG-UI events, encoded by ag-ui-protocol's EventEncoder. The SSE id
    (the Keel offset) rides on the last AG-UI event of each Keel event, so a reconnect never
    resumes in the middle of one."""
    encoder, mapper = EventEncoder(), AguiMapper(run_id)
    for started in mapper.started():
        yield encoder.encode(started).encode()
    try:
        async for offset, event in events:
            mapped = mapper.map(event)
            for i, out in enumerate(mapped):
                frame = encoder.encode(out)
                if i == len(mapped) - 1:
                    frame = f"id: {offset}{SEP}{frame}"
                yield frame.encode()
    except Exception as e:
        err = _error(e, path)
        yield f"event: error{SEP}data: {err['data']}{SEP}{SEP}".encode()


async def caller_runs(agents: AgentClient, limit: int, path: str) -> AsyncIterator[dict[str, str]]:
    """The caller's runs (those they may see) as they change: each run when it first shows or
    changes, and the count of open approvals when it changes. Lists come from Temporal's
    visibility store (no worker needed), looked at every RUNS_EVERY seconds."""
    shown: dict[str, str] = {}
    count: int | None = None
    try:
        while True:
            now: dict[str, str] = {}
            for run in reversed(await agents.list(limit=limit)):  # oldest first
                now[run.run_id] = data = run.model_dump_json()
                if shown.get(run.run_id) != data:
                    yield {"event": "run", "data": data}
            shown = now  # what is no longer listed is forgotten
            n = await agents.open_approvals()
            if n != count:
                count = n
                yield {"event": "approvals", "data": json.dumps({"count": n})}
            await asyncio.sleep(RUNS_EVERY)
    except Exception as e:
        yield _error(e, path)
