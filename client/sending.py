"""How `AgentClient.send_message` sends: what an error on the way means for resending, and
the slots that keep a client's messages to one run within what Temporal takes at once."""

from __future__ import annotations

import asyncio
from dataclasses import InitVar, dataclass, field
from enum import StrEnum

from temporalio.service import RPCError, RPCStatusCode

SEND_ATTEMPTS = 10  # a message is idempotent by its id: resending it is always safe
SEND_RETRY_FIRST = 0.1
SEND_RETRY_MAX = 5.0
UNKNOWN_OUTCOME = {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED}
# Temporal takes 10 updates in flight per run and refuses the rest: a client keeps below it
MESSAGES_IN_FLIGHT = 8
SERVED_TRUST = 5.0  # seconds a run seen served is trusted to be, for a burst of messages
# One request's payloads: Temporal's blob limit (2 MiB; gRPC itself refuses past 4 MiB)
MAX_REQUEST_BYTES = 2 * 1024 * 1024
# what gRPC and Temporal say of a request too large (RESOURCE_EXHAUSTED is also "busy")
TOO_LARGE_SIGNS = ("larger than max", "message too large", "exceeds limit", "size exceeds")


class SendFailure(StrEnum):
    BUSY = "busy"  # too many updates in flight to the run: back off and resend
    UNKNOWN = "unknown"  # no answer: it may have arrived; resend under the same id
    TOO_LARGE = "too_large"  # no resend can help
    GONE = "gone"  # no such run
    OTHER = "other"


def send_failure(e: RPCError) -> SendFailure:
    """What an RPC error on sending a message means for resending it."""
    text = (e.message or "").lower()
    if any(sign in text for sign in TOO_LARGE_SIGNS):
        return SendFailure.TOO_LARGE
    if e.status == RPCStatusCode.NOT_FOUND:
        return SendFailure.GONE
    if e.status == RPCStatusCode.RESOURCE_EXHAUSTED:
        return SendFailure.BUSY
    if e.status in UNKNOWN_OUTCOME:
        return SendFailure.UNKNOWN
    return SendFailure.OTHER


@dataclass
class Gate:
    limit: InitVar[int]
    users: int = 0
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
