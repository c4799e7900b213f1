"""A reply streamed from the provider: chunks read into the whole reply, and the pieces sent on
to the run as they are written.

The activity still returns the whole reply (what the run records and replays); the pieces
only feed watchers. They go to the run as `keel.model_stream` signals, in batches: the first
once the reply has been written for `FIRST_BATCH_SECONDS` (a reply finished sooner is not
streamed at all: its `model_reply` event comes as fast), then one every `BATCH_SECONDS` (five
a second: readable as it grows, and each is a signal and a workflow task of history), or
sooner when `BATCH_CHARS` have gathered. Each batch names the call (`stream_id`) and the
attempt, so the run can tell a retried attempt's text from its predecessor's. Sending never
fails the model call: a batch that cannot be sent is dropped, and the reply is whole anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from temporalio import activity

from keel.workflows.models import SIGNAL_STREAM, StreamBatch, StreamDelta

FIRST_BATCH_SECONDS = 0.08
BATCH_SECONDS = 0.2  # each batch is a signal and a workflow task in the run's history
BATCH_CHARS = 16_000
log = logging.getLogger("keel.model")


class StreamBroke(Exception):
    """The connection broke off in the middle of a stream: another attempt may get it whole."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's transport errors (the openai SDK uses httpx, or httpx2 in newer
    releases), which the SDK lets through unwrapped while a stream is read."""
    found = [getattr(sys.modules.get(n), "TransportError", None) for n in ("httpx", "httpx2")]
    return tuple(e for e in found if isinstance(e, type) and issubclass(e, BaseException))


class BadStream(Exception):
    """The provider answered a streamed request with something that is not a stream of
    chat completion chunks: the call asks for a whole reply instead. `never`: nothing came
    that could be read as a stream at all (this provider does not stream)."""

    def __init__(self, message: str, *, never: bool = False) -> None:
        super().__init__(message)
        self.never = never


@dataclass
class _Call:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Reply:
    """A whole reply, as the activity records it: from one completion, or from a stream."""

    text: str | None = None
    raw_calls: list[Any] | None = None  # shaped as the SDK's (`normalise_tool_calls`)
    finish_reason: str = ""
    model: str = ""
    usage: Any = None

    @classmethod
    def of(cls, completion: ChatCompletion) -> Reply:
        choice = completion.choices[0]
        return cls(
            text=choice.message.content,
            raw_calls=choice.message.tool_calls,
            finish_reason=choice.finish_reason or "",
            model=completion.model or "",
            usage=completion.usage,
        )


@dataclass
class _Chunks:
    """The reply being put together from the stream's chunks."""

    content: str = ""
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str = ""
    model: str = ""
    usage: Any = None
    chunks: int = 0

    def add(self, chunk: ChatCompletionChunk) -> list[StreamDelta]:
        """Take one chunk in; returns the pieces it adds."""
        self.chunks += 1
        self.model = chunk.model or self.model
        if chunk.usage is not None:
            self.usage = chunk.usage
        pieces: list[StreamDelta] = []
        for choice in chunk.choices[:1]:
            delta = choice.delta
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            if delta is None:
                continue
            if delta.content:
                self.content += delta.content
                pieces.append(StreamDelta(text=delta.content))
            for tc in delta.tool_calls or []:
                call = self.calls.setdefault(tc.index, _Call())
                fn = tc.function
                name = fn.name if fn is not None and fn.name else ""
                more = fn.arguments if fn is not None and fn.arguments else ""
                call.id = tc.id or call.id
                call.name += name
                call.arguments += more
                if name or more:
                    pieces.append(StreamDelta(call_index=tc.index, tool=name, arguments=more))
        return pieces

    def reply(self) -> Reply:
        return Reply(
            text=self.content or None,  # as a whole reply says "no text": null, not ""
            raw_calls=[_SdkCall(c) for _, c in sorted(self.calls.items())],
            finish_reason=self.finish_reason,
            model=self.model,
            usage=self.usage,
        )


class _SdkCall:
    def __init__(self, call: _Call) -> None:
        self.id = call.id
        self.function = _SdkFunction(call.name, call.arguments)


@dataclass
class _SdkFunction:
    name: str
    arguments: str


class Batcher:
    """Gathers pieces and sends them to the run in batches, in order, from a task of its own
    (reading the stream never waits on the run)."""

    def __init__(self, stream_id: str) -> None:
        info = activity.info()
        self._handle = activity.client().get_workflow_handle(
            info.workflow_id, run_id=info.workflow_run_id
        )
        self._stream_id = stream_id
        self._attempt = info.attempt
        self._pending: list[StreamDelta] = []
        self._chars = 0
        self._wake = asyncio.Event()
        self._done = False
        self._broken = False
        self._sent = 0
        self._task: asyncio.Task[None] | None = None

    def add(self, pieces: list[StreamDelta]) -> None:
        if not pieces or self._broken:
            return
        self._pending.extend(pieces)
        self._chars += sum(len(p.text) + len(p.arguments) for p in pieces)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        if self._chars >= BATCH_CHARS:
            self._wake.set()

    async def finish(self) -> None:
        """The reply is whole: what was not sent yet goes, if anything went before (a reply
        that came whole within the first batch's time is not streamed at all)."""
        self._done = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def void(self) -> None:
        """The stream turned out bad: nothing more is sent, and if anything was, the run is
        told to drop it (the call's reply comes another way)."""
        self.abandon()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        if self._sent:
            self._broken = False
            self._pending = []
            await self._send(restart=True)
            self._broken = True

    def abandon(self) -> None:
        """The call failed or was cancelled: nothing more is sent."""
        self._broken = True
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        await self._sleep(FIRST_BATCH_SECONDS)
        if self._done and not self._sent:
            return  # the whole reply is as fast as a first batch
        while True:
            await self._send()
            if self._done or self._broken:
                if self._pending and not self._broken:
                    await self._send()
                return
            await self._sleep(BATCH_SECONDS)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _send(self, restart: bool = False) -> None:
        if not self._pending and not restart:
            return
        pieces, self._pending, self._chars = _merge(self._pending), [], 0
        batch = StreamBatch(
            stream_id=self._stream_id, attempt=self._attempt, deltas=pieces, restart=restart
        )
        try:
            await self._handle.signal(SIGNAL_STREAM, batch)
            self._sent += 1
        except Exception as e:  # the run is gone, or the server busy: the reply is whole
            log.warning("streaming to the run stopped (the reply is whole anyway): %s", e)
            self._broken = True


def _merge(pieces: list[StreamDelta]) -> list[StreamDelta]:
    """Consecutive pieces of the same text or call as one."""
    out: list[StreamDelta] = []
    for p in pieces:
        last = out[-1] if out else None
        if last is not None and last.call_index == p.call_index and not p.tool:
            out[-1] = last.model_copy(
                update={"text": last.text + p.text, "arguments": last.arguments + p.arguments}
            )
        else:
            out.append(p)
    return out


async def stream_reply(client: AsyncOpenAI, body: dict[str, Any], stream_id: str) -> Reply:
    """Ask for the reply as a stream and read it whole, sending its pieces to the run.
    Raises the SDK's errors as a whole request would (the caller classifies them), and
    BadStream when what came back is no stream of chunks."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    batcher = Batcher(stream_id)
    reply = _Chunks()
    try:
        stream = await client.post(
            "/chat/completions",
            body=body,
            cast_to=ChatCompletionChunk,
            stream=True,
            stream_cls=AsyncStream[ChatCompletionChunk],
        )
        async for chunk in stream:
            if (
                not isinstance(chunk, ChatCompletionChunk)
                or chunk.object != "chat.completion.chunk"
            ):
                raise BadStream(f"a stream item that is not a chunk: {str(chunk)[:200]}")
            batcher.add(reply.add(chunk))
    except _transport_errors() as e:
        batcher.abandon()
        raise StreamBroke(f"{type(e).__name__}: {e}") from e
    except (BadStream, ValueError, AttributeError, TypeError, KeyError) as e:
        await batcher.void()  # what was shown of it is not the reply
        raise BadStream(f"{type(e).__name__}: {e}", never=reply.chunks == 0) from e
    except BaseException:
        batcher.abandon()
        raise
    if reply.chunks == 0:
        batcher.abandon()
        raise BadStream("the stream ended without a single chunk", never=True)
    await batcher.finish()
    return reply.reply()
