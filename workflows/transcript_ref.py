"""A conversation stored once: the model request refers to what the worker's store holds.

Each message extends a hash chain, `head[i] = sha256(head[i-1], message i)`, so a chain head
names a whole prefix of the conversation and its content. With payload storage on, the model
activity keeps each request's new messages as a segment under the chain head they end at;
the next request carries that head (`base`) and only the messages after it, and the activity
rebuilds the whole context from the store. Stored bytes and history bytes then grow with the
conversation, not with its square; the provider still gets the whole context each time.

Pure and deterministic: the workflow computes the chain (incrementally, O(new messages) per
step) and the activity checks it with the same function."""

from __future__ import annotations

import hashlib
from collections import deque

from keel.workflows.models import ChatMessage, ModelInput

KEEP_STORED = 64  # chain heads of earlier requests kept as possible bases (after a rollback)


def chain_head(prev: str, message: ChatMessage) -> str:
    """The chain head after `message`, following `prev` ("" at the start). Fields left at their
    defaults are not hashed, so a field added later leaves the heads of old messages as they
    were."""
    data = message.model_dump_json(exclude_defaults=True).encode()
    return hashlib.sha256(prev.encode() + b"\n" + data).hexdigest()


def chain_of(prev: str, messages: list[ChatMessage]) -> str:
    """The chain head after all of `messages`."""
    for m in messages:
        prev = chain_head(prev, m)
    return prev


class TranscriptChain:
    """The chain over the context a run's model requests carry, kept up to date in O(new
    messages) a step, and the heads of the contexts the worker stored (this history's
    successful model calls). Messages are never changed in place: a changed message (a
    rollback, a compaction, a cut context) is a new object, found by identity, and the chain
    is recomputed from there."""

    def __init__(self) -> None:
        self._messages: list[ChatMessage] = []  # the context hashed (held: identities stay)
        self._heads: list[str] = []
        self._calls: dict[str, int] = {}  # call id → how many hashed messages carry it
        self._stored: deque[tuple[int, str]] = deque(maxlen=KEEP_STORED)  # (length, head)
        self._pending: str = ""  # the head of the request in flight

    def _follow(self, messages: list[ChatMessage]) -> None:
        same = 0
        limit = min(len(messages), len(self._messages))
        while same < limit and messages[same] is self._messages[same]:
            same += 1
        for m in self._messages[same:]:
            for c in m.tool_calls:
                self._calls[c.id] -= 1
                if not self._calls[c.id]:
                    del self._calls[c.id]
        del self._messages[same:], self._heads[same:]
        prev = self._heads[-1] if self._heads else ""
        for m in messages[same:]:
            prev = chain_head(prev, m)
            self._messages.append(m)
            self._heads.append(prev)
            for c in m.tool_calls:
                self._calls[c.id] = self._calls.get(c.id, 0) + 1

    def refer(self, request: ModelInput) -> ModelInput:
        """`request` with its context by reference: the messages after the longest prefix
        the store holds, and only the reserved call ids its context does not show."""
        messages = request.messages
        self._follow(messages)
        base, start = "", 0
        for n, head in reversed(self._stored):
            if 0 < n <= len(self._heads) and self._heads[n - 1] == head:
                base, start = head, n
                break
        self._pending = self._heads[-1] if self._heads else ""
        reserved = [i for i in request.reserved_call_ids if i not in self._calls]
        return request.model_copy(
            update={
                "base": base,
                "head": self._pending,
                "messages": messages[start:],
                "reserved_call_ids": reserved,
            }
        )

    def stored(self, head: str) -> None:
        """The worker stored the context of the request in flight under `head`."""
        if head and head == self._pending:
            n = len(self._heads)
            if not self._stored or self._stored[-1] != (n, head):
                self._stored.append((n, head))
        self._pending = ""

    def carried(self) -> str:
        """The latest stored context, as `AgentState.context_stored` carries it."""
        if not self._stored:
            return ""
        n, head = self._stored[-1]
        return f"{n}:{head}"

    def take_up(self, carried: str) -> None:
        """Start from the stored context a previous history carried (`carried`)."""
        n, _, head = carried.partition(":")
        if n.isdigit() and head:
            self._stored.append((int(n), head))

    def forget(self) -> None:
        """The store lost a piece: the next request goes whole."""
        self._stored.clear()
