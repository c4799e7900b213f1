"""The model request's whole context, rebuilt from a reference (keel.workflows.transcript_ref).

A request refers to the conversation the worker stored by its chain head (`base`) and brings
only the messages after it. The latest contexts are kept in memory (least recently used
first out); a context not there is rebuilt by walking the store's segments back, each checked
against its chain head. What this worker stores is then what the next request refers to."""

from __future__ import annotations

import logging
from collections import OrderedDict

from temporalio.exceptions import ApplicationError

from keel.storage import SegmentMissing, TranscriptStore
from keel.workflows import errors
from keel.workflows.models import ChatMessage, ModelInput, TranscriptSegment
from keel.workflows.transcript_ref import chain_of

log = logging.getLogger("keel.model")
CACHE_CHARS = 64_000_000  # text of the contexts kept in memory, counted per context


def _chars(messages: list[ChatMessage]) -> int:
    return sum(len(m.content or "") + sum(len(c.arguments) for c in m.tool_calls) for m in messages)


def missing(why: str) -> ApplicationError:
    """The failure that makes the workflow send the step again, whole (never retried)."""
    return ApplicationError(
        f"the conversation this model request refers to is not in the store: {why}",
        type=errors.TRANSCRIPT_MISSING,
        non_retryable=True,
    )


class Transcripts:
    """Contexts by chain head: in memory, else from the worker's store."""

    def __init__(self, store: TranscriptStore | None, cache_chars: int = CACHE_CHARS) -> None:
        self.store = store
        self._cache: OrderedDict[str, tuple[list[ChatMessage], int]] = OrderedDict()
        self._chars = 0
        self._limit = cache_chars
        self._warned = False

    def _keep(self, head: str, messages: list[ChatMessage], chars: int) -> None:
        old = self._cache.pop(head, None)
        if old is not None:
            self._chars -= old[1]
        self._cache[head] = (messages, chars)
        self._chars += chars
        while self._chars > self._limit and len(self._cache) > 1:
            _, (_, n) = self._cache.popitem(last=False)
            self._chars -= n

    def _cached(self, head: str) -> tuple[list[ChatMessage], int] | None:
        got = self._cache.get(head)
        if got is not None:
            self._cache.move_to_end(head)
        return got

    async def _whole(self, head: str) -> tuple[list[ChatMessage], int]:
        """The context ending at `head`: from memory, or walked back through the store."""
        got = self._cached(head)
        if got is not None:
            return got
        if self.store is None:
            raise missing("this worker stores no payloads")
        pieces: list[TranscriptSegment] = []
        key = head
        while key:
            got = self._cached(key)
            if got is not None:
                break
            try:
                segment = await self.store.get(key)
            except SegmentMissing as e:
                raise missing(str(e)) from None
            if chain_of(segment.prev, segment.messages) != key:
                raise missing(f"the piece {key} in {self.store.where()} is not what it claims")
            pieces.append(segment)
            key = segment.prev
        messages, chars = list(got[0]) if got else [], got[1] if got else 0
        for segment in reversed(pieces):
            messages += segment.messages
            chars += _chars(segment.messages)
        self._keep(head, messages, chars)
        return messages, chars

    async def context(self, input: ModelInput) -> tuple[list[ChatMessage], str]:
        """The request's whole context, and the chain head it is stored under ("" when it
        is not: no store, or a request sent whole by a run recorded before references)."""
        if not input.base and not input.head:
            return input.messages, ""
        prefix, chars = await self._whole(input.base) if input.base else ([], 0)
        messages = prefix + input.messages
        if self.store is None or not input.head:
            return messages, ""
        head = chain_of(input.base, input.messages)
        if head != input.head:
            # the workflow hashed its messages otherwise (another version of Keel, say):
            # correct, but its next request will not find this one and goes whole
            if not self._warned:
                self._warned = True
                log.warning("a model request's chain head differs from this worker's")
            return messages, ""
        if self._cached(head) is None:
            await self.store.put(head, TranscriptSegment(prev=input.base, messages=input.messages))
            self._keep(head, messages, chars + _chars(input.messages))
        return messages, head
