"""One watcher per run, however many people follow it.

Each poll of a run's event stream is an update in the run's history, so a `keel serve` that
polled once per browser would add history for every person watching. `RunFeeds` keeps one
subscription per run (`AgentClient.events` from the run's first retained event) and hands
its events to every follower of that run, each from the offset it asked for; the
subscription ends with the run, or when its last follower leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from keel.client.api import AgentClient
from keel.workflows.models import RunEvent


class _Feed:
    """One run's events as one watcher read them, and who follows them."""

    def __init__(self, agents: AgentClient, run_id: str) -> None:
        self.items: list[tuple[int, RunEvent]] = []
        self.error: Exception | None = None
        self.done = False
        self.followers = 0
        self.changed = asyncio.Condition()
        self.task = asyncio.create_task(self._read(agents, run_id))

    async def _read(self, agents: AgentClient, run_id: str) -> None:
        try:
            async for item in agents.events(run_id, from_offset=0):
                async with self.changed:
                    self.items.append(item)
                    self.changed.notify_all()
        except Exception as e:  # every follower gets it
            self.error = e
        finally:
            self.done = True
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                async with self.changed:
                    self.changed.notify_all()


class RunFeeds:
    """The gateway's shared watchers, one per run followed."""

    def __init__(self) -> None:
        self._feeds: dict[str, _Feed] = {}

    async def follow(
        self, agents: AgentClient, run_id: str, start: int
    ) -> AsyncIterator[tuple[int, RunEvent]]:
        """The run's events from offset `start`, live, until it ends (errors as the run's
        own watcher met them). The caller checked that this person may see the run."""
        feed = self._feeds.get(run_id)
        if feed is None or (feed.done and feed.error is not None):
            feed = self._feeds[run_id] = _Feed(agents, run_id)
        feed.followers += 1
        try:
            seen = 0
            while True:
                async with feed.changed:
                    await feed.changed.wait_for(lambda n=seen: n < len(feed.items) or feed.done)
                    batch, seen, done = feed.items[seen:], len(feed.items), feed.done
                for offset, event in batch:
                    if offset >= start:
                        yield offset, event
                if done and seen == len(feed.items):
                    if feed.error is not None:
                        raise feed.error
                    return
        finally:
            feed.followers -= 1
            if feed.followers == 0 and self._feeds.get(run_id) is feed:
                del self._feeds[run_id]
                feed.task.cancel()
