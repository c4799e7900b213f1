"""Messages at the door: sizes counted in bytes, a run kept within what it can carry, a
message too large to send refused at once, and a burst from many senders taken whole."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from keel.client import api
from keel.client.api import MessageTooLarge, SendFailure, send_failure
from keel.workflows.inbox import MAX_MESSAGE_BYTES, message_refusal
from keel.workflows.models import SIGNAL_MESSAGE, AgentState, AgentStatus, ChatMessage, MessageInput
from keel.workflows.views import context_window
from tests.conftest import Harness, wait_for

FOUR_BYTES = "\U0001f600"  # one character, four bytes in UTF-8


def test_four_byte_characters_count_as_bytes() -> None:
    state = AgentState(agent="calc", user="u", status=AgentStatus.IDLE)
    fits = MessageInput(text=FOUR_BYTES * (MAX_MESSAGE_BYTES // 4))
    over = MessageInput(text=FOUR_BYTES * (MAX_MESSAGE_BYTES // 4 + 1))
    assert len(over.text) < MAX_MESSAGE_BYTES  # under the limit if characters were counted
    assert message_refusal(None, state, fits) == ""
    refusal = message_refusal(None, state, over)
    assert f"{MAX_MESSAGE_BYTES + 4} bytes" in refusal and str(MAX_MESSAGE_BYTES) in refusal


def test_the_model_request_window_counts_bytes() -> None:
    turn = [
        ChatMessage(role="user", content=FOUR_BYTES * 200),
        ChatMessage(role="assistant", content="ok"),
    ]
    transcript = [ChatMessage(role="system", content="s"), *turn, *turn]
    # 802 bytes a turn, 202 characters: a 1000-byte window holds the last turn only
    window = context_window(transcript, 1000)
    assert window[1:] == turn
    assert context_window(transcript, 2000) == transcript


def test_send_failures_are_told_apart() -> None:
    def error(message: str, status: RPCStatusCode) -> RPCError:
        return RPCError(message, status, b"")

    busy = "limit on number of concurrent in-flight updates has been reached (10)"
    assert send_failure(error(busy, RPCStatusCode.RESOURCE_EXHAUSTED)) == SendFailure.BUSY
    grpc = "Sending message larger than max (5242926 vs. 4194304)"
    assert send_failure(error(grpc, RPCStatusCode.RESOURCE_EXHAUSTED)) == SendFailure.TOO_LARGE
    blob = "Blob data size exceeds limit."
    assert send_failure(error(blob, RPCStatusCode.INVALID_ARGUMENT)) == SendFailure.TOO_LARGE
    assert send_failure(error("gone", RPCStatusCode.NOT_FOUND)) == SendFailure.GONE
    assert send_failure(error("x", RPCStatusCode.UNAVAILABLE)) == SendFailure.UNKNOWN


async def _idle(h: Harness, run: str) -> bool:
    return (await h.agents.status(run)).status == AgentStatus.IDLE


async def test_a_message_the_run_could_not_carry_is_refused_and_the_run_goes_on(
    harness: Harness,
) -> None:
    """Quotes take two bytes each in the carried state's JSON: the conversation stays well
    under what a model request carries while the state nears what a history can carry."""
    quotes = '"' * 90_000
    async with harness.running():
        run = await harness.start("chat-long", "say hello")
        await wait_for(lambda: _idle(harness, run))
        receipts = []
        for _ in range(12):
            receipts.append(await harness.agents.send_message(run, quotes))
            await wait_for(lambda: _idle(harness, run))
            if receipts[-1].status == "rejected":
                break
        # sent as a signal, the same message is recorded as refused, with why
        await harness.client.get_workflow_handle(run).signal(SIGNAL_MESSAGE, {"text": quotes})

        async def recorded() -> Any:
            s = await harness.agents.get_state(run)
            return s if any("too large to carry" in a.detail for a in s.audit) else None

        state = await wait_for(recorded)
        await harness.agents.cancel(run)
        ended = await harness.agents.result(run, timeout=60)
    refused = receipts[-1]
    assert refused.status == "rejected", receipts
    assert "too large to carry" in refused.reason and "bytes" in refused.reason
    assert all(r.status != "rejected" for r in receipts[:-1])
    # the run goes on with what it took: waiting for its next message, ended only by its user
    assert state.status == AgentStatus.IDLE and state.transcript[-1].role == "assistant"
    assert ended.status == AgentStatus.CANCELLED


async def test_a_message_too_large_to_send_is_refused_at_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    start_update = WorkflowHandle.start_update

    async def counted(self: WorkflowHandle[Any, Any], *args: Any, **kwargs: Any) -> Any:
        sent.append(kwargs.get("id", ""))
        return await start_update(self, *args, **kwargs)

    monkeypatch.setattr(WorkflowHandle, "start_update", counted)
    big = "x" * 5_000_000
    async with harness.running():
        run = await harness.start("chat", "say hello")
        await wait_for(lambda: _idle(harness, run))
        with pytest.raises(MessageTooLarge, match=r"5000\d{3} bytes .* over the 2097152-byte"):
            await harness.agents.send_message(run, big)
        assert sent == []  # refused before sending
        # past Keel's own check, gRPC refuses it: said so, on the first attempt
        monkeypatch.setattr(api, "MAX_REQUEST_BYTES", 10 * 2**20)
        with pytest.raises(MessageTooLarge, match="too large to send"):
            await harness.agents.send_message(run, big)
        assert len(sent) == 1
        receipt = await harness.agents.send_message(run, "say hello")
        await harness.agents.cancel(run)
    assert receipt.status == "delivered"


async def test_a_burst_of_messages_is_taken_each_once(harness: Harness) -> None:
    texts = [f"note {i}" for i in range(60)]
    gate = asyncio.Semaphore(30)

    async def send(text: str) -> Any:
        async with gate:
            return await harness.agents.send_message(run, text, "queue")

    async with harness.running():
        run = await harness.start("chat-long", "say hello")
        await wait_for(lambda: _idle(harness, run))
        receipts = await asyncio.gather(*(send(t) for t in texts))

        async def all_answered() -> Any:
            s = await harness.agents.get_state(run)
            said = {m.content for m in s.transcript if m.role == "user"}
            return s if s.status == AgentStatus.IDLE and set(texts) <= said else None

        state = await wait_for(all_answered, timeout=120)
        await harness.agents.cancel(run)
    assert [r.status for r in receipts if r.status not in ("queued", "delivered")] == []
    users = [m.content for m in state.transcript if m.role == "user"]
    assert sorted(u for u in users if u in texts) == sorted(texts)  # each once
