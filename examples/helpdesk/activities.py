"""The helpdesk's own activities (a name Keel's own `keel.activities` never collides with)."""

from __future__ import annotations

import asyncio

from agents import desk
from temporalio import activity


@activity.defn(name="helpdesk.count_tickets")
async def count_tickets() -> int:
    """How many tickets the desk holds."""
    return await asyncio.to_thread(desk().count)
