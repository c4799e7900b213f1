"""Heartbeating around long awaits, so cancellation (interrupts, `keel cancel`) arrives fast."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import activity

T = TypeVar("T")

try:  # tracing is optional (keel[otel])
    from opentelemetry import trace as otel
except ImportError:  # pragma: no cover
    otel = None  # type: ignore[assignment]


def annotate_span(attributes: dict[str, str | int | float | bool]) -> None:
    """Add Keel's attributes to the activity's span, when tracing is on."""
    if otel is not None:
        otel.get_current_span().set_attributes(attributes)


# a live call's heartbeats reach the server well inside the 2.5 s heartbeat timeout even on
# a busy worker (workflows/steps.py)
HEARTBEAT_EVERY_SECONDS = 0.5


async def heartbeat_while(coro: Awaitable[T]) -> T:
    """Await `coro`, heartbeating meanwhile; a cancellation cancels `coro` too."""
    task = asyncio.ensure_future(coro)
    beating = activity.in_activity() and not activity.info().is_local
    if beating:  # at once: a busy worker's first beat must not wait out the interval
        activity.heartbeat()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_SECONDS)
            if done:
                return task.result()
            if beating:
                activity.heartbeat()
    finally:
        if not task.done():
            task.cancel()
