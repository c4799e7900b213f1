"""The scripted model's streamed replies, read by the real openai client."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from keel.testing.model_server import RulesError, RuleSet, ScriptedModelServer
from keel.testing.model_server.chunks import pieces
from tests.rules import TEST_RULES

TEXT = "The quick brown fox jumps over the lazy dog, twice over."

STREAM_RULES: dict[str, Any] = {
    **TEST_RULES,
    "rules": [
        {
            "name": "paced",
            "when": {"last_user": "paced"},
            "reply": {"content": TEXT, "chunk_size": 5},
        },
        {
            "name": "paced calls",
            "when": {"last_user": "call in pieces"},
            "reply": {
                "chunk_size": 4,
                "tool_calls": [{"name": "add", "arguments": {"a": 12345, "b": 67890}}],
            },
        },
        {
            "name": "half",
            "when": {"last_user": "half"},
            "reply": {"content": TEXT, "hold_after": {"gate": "mid", "chunks": 2}},
        },
        {
            "name": "pause",
            "when": {"last_user": "pause"},
            "reply": {"content": TEXT, "hold_after": {"gate": "pause"}},
        },
        {
            "name": "stay",
            "when": {"last_user": "stay"},
            "reply": {"content": TEXT, "hold_after": {"gate": "stay", "chunks": 1}},
        },
        {
            "name": "drop",
            "when": {"last_user": "drop"},
            "reply": {"content": TEXT, "break_after": {"kind": "drop", "chunks": 3}},
        },
        {
            "name": "malformed",
            "when": {"last_user": "malformed"},
            "reply": {"content": TEXT, "break_after": {"kind": "malformed"}},
        },
        {
            "name": "dawdle",
            "when": {"last_user": "dawdle"},
            "reply": {"content": TEXT, "chunk_delay": 600},
        },
        {
            "name": "held whole",
            "when": {"last_user": "held whole"},
            "reply": {"content": TEXT, "hold": "start"},
        },
        *TEST_RULES["rules"],
    ],
}


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(STREAM_RULES) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()


@pytest.fixture
def aclient(server: ScriptedModelServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def stream(client: AsyncOpenAI, text: str, **kw: Any) -> AsyncIterator[ChatCompletionChunk]:
    return await client.chat.completions.create(model="m", messages=user(text), stream=True, **kw)


def accumulate(chunks: list[ChatCompletionChunk]) -> dict[str, Any]:
    """The message the chunks spell, in the non-streamed message's shape."""
    message: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.role is not None:
                message["role"] = delta.role
            if delta.content is not None:
                message["content"] = message.get("content", "") + delta.content
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"function": {"arguments": ""}})
                if part.id is not None:
                    call["id"] = part.id
                if part.type is not None:
                    call["type"] = part.type
                if part.function is not None:
                    if part.function.name is not None:
                        call["function"]["name"] = part.function.name
                    call["function"]["arguments"] += part.function.arguments or ""
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def whole(r: ChatCompletion) -> dict[str, Any]:
    return r.choices[0].message.model_dump(exclude_none=True)


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize(
    "text",
    [
        "Please say hello",
        "paced",
        "add 2 and 40",
        "give me two sums",
        "call in pieces",
        "broken json",
        "quirky",
        "quirky without ids",
    ],
)
async def test_chunks_spell_the_whole_reply(
    server: ScriptedModelServer, aclient: AsyncOpenAI, text: str
) -> None:
    r = await aclient.chat.completions.create(model="m", messages=user(text))
    options = {"include_usage": True}
    chunks = [c async for c in await stream(aclient, text, stream_options=options)]
    assert accumulate(chunks) == whole(r)
    assert {(c.id, c.created, c.model, c.object) for c in chunks} == {
        (r.id, r.created, "m", "chat.completion.chunk")
    }
    *replies, finish, last = chunks
    assert replies[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in replies] == [None] * len(replies)
    assert finish.choices[0].finish_reason == r.choices[0].finish_reason
    assert finish.choices[0].delta.model_dump(exclude_none=True) == {}
    assert last.choices == [] and last.usage == r.usage
    assert all(c.usage is None for c in [*replies, finish])
    # the library's own accumulator agrees
    async with aclient.chat.completions.stream(model="m", messages=user(text)) as s:
        final = await s.get_final_completion()
    assert final.choices[0].finish_reason == r.choices[0].finish_reason
    message = final.choices[0].message
    assert message.content == r.choices[0].message.content
    got = [c.model_dump(exclude_none=True, exclude={"index"}) for c in message.tool_calls or []]
    assert got == [c.model_dump(exclude_none=True) for c in r.choices[0].message.tool_calls or []]
    # one request each: a streamed request is logged and counted once
    assert [e["outcome"] for e in server.requests()] == ["served"] * len(server.requests())


async def test_no_usage_chunk_unless_asked(aclient: AsyncOpenAI) -> None:
    chunks = [c async for c in await stream(aclient, "Please say hello")]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks)


def test_server_sent_events_on_the_wire(server: ScriptedModelServer) -> None:
    body = json.dumps({"model": "m", "messages": user("paced"), "stream": True}).encode()
    req = urllib.request.Request(server.base_url + "/chat/completions", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as resp:
        headers, raw = resp.headers, resp.read().decode()
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["connection"] == "close"
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    data = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    text = [d["choices"][0]["delta"]["content"] for d in data[1:-1]]
    assert "".join(text) == TEXT and {len(t) for t in text[:-1]} == {5}
    assert data[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_pieces() -> None:
    assert pieces("") == []
    assert pieces("abcdefg", 3) == ["abc", "def", "g"]
    assert pieces("one two three four five", None) == ["one two three", " four five"]
    for text in ["  lead and trail  ", "\n", "a\nb  c\td e f g", '{"a": 1, "b": 2}']:
        for size in (None, 1, 2, 7):
            assert "".join(pieces(text, size)) == text


async def test_tool_call_arguments_come_in_pieces(aclient: AsyncOpenAI) -> None:
    chunks = [c async for c in await stream(aclient, "call in pieces")]
    header = chunks[0].choices[0].delta
    assert header.role == "assistant" and header.content is None
    assert header.tool_calls is not None
    [call] = header.tool_calls
    assert call.index == 0 and call.id and call.type == "function"
    assert call.function is not None and call.function.name == "add"
    assert call.function.arguments == ""
    parts = []
    for c in chunks[1:-1]:
        [part] = c.choices[0].delta.tool_calls or []
        assert part.index == 0 and part.id is None and part.function is not None
        parts.append(part.function.arguments or "")
    assert len(parts) > 1 and all(len(p) <= 4 for p in parts)
    assert json.loads("".join(parts)) == {"a": 12345, "b": 67890}


# --------------------------------------------------------------------------- held and broken


async def test_a_reply_held_half_written(server: ScriptedModelServer, aclient: AsyncOpenAI) -> None:
    chunks = await stream(aclient, "half")
    await server.wait_held("mid")
    first = [await anext(chunks), await anext(chunks)]  # sent before it paused
    assert first[0].choices[0].delta.role == "assistant"
    assert first[1].choices[0].delta.content == "The quick brown"
    assert server.held("mid") == 1 and server.requests()[0]["outcome"] == "pending"
    server.release("mid")
    rest = [c async for c in chunks]
    assert accumulate(first + rest)["content"] == TEXT
    assert server.stats() == {"requests": 1, "served": 1, "faults": 0, "errors": 0}


async def test_a_client_that_leaves_frees_the_gate(server: ScriptedModelServer) -> None:
    client = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    chunks = await client.chat.completions.create(model="m", messages=user("stay"), stream=True)
    await server.wait_held("stay")
    await anext(chunks)
    await chunks.close()  # as a cancelled model call does
    while server.held("stay"):
        await asyncio.sleep(0.01)  # the server notices on its own loop
    assert server.requests()[0]["outcome"] == "disconnected"
    assert server.stats()["served"] == 0


async def test_a_whole_reply_waits_at_its_mid_stream_gate(
    server: ScriptedModelServer, aclient: AsyncOpenAI
) -> None:
    reply = asyncio.create_task(aclient.chat.completions.create(model="m", messages=user("pause")))
    await server.wait_held("pause")
    assert not reply.done()
    server.release("pause")
    assert (await reply).choices[0].message.content == TEXT


async def test_a_dropped_stream(server: ScriptedModelServer, aclient: AsyncOpenAI) -> None:
    chunks = await stream(aclient, "drop")
    got = [await anext(chunks) for _ in range(3)]
    with pytest.raises(openai.APIConnectionError) as exc:
        await anext(chunks)
    assert "incomplete chunked read" in str(exc.value.__cause__)
    assert accumulate(got)["content"] == "The quick brown fox jumps over"
    with pytest.raises(openai.APIConnectionError):  # a whole reply is cut off too
        await aclient.chat.completions.create(model="m", messages=user("drop"))
    assert [e["outcome"] for e in server.requests()] == ["broken:drop"] * 2
    assert server.stats() == {"requests": 2, "served": 0, "faults": 0, "errors": 2}


async def test_a_malformed_chunk(server: ScriptedModelServer, aclient: AsyncOpenAI) -> None:
    chunks = await stream(aclient, "malformed")
    got = [await anext(chunks) for _ in range(2)]  # the role and a first piece, by default
    with pytest.raises(json.JSONDecodeError):
        await anext(chunks)
    assert accumulate(got)["content"] == "The quick brown"
    with pytest.raises(json.JSONDecodeError):
        await aclient.chat.completions.create(model="m", messages=user("malformed"))
    assert [e["outcome"] for e in server.requests()] == ["broken:malformed"] * 2


async def test_break_faults(server: ScriptedModelServer, aclient: AsyncOpenAI) -> None:
    server.set_faults(
        [{"kind": "drop", "count": 2, "chunks": 1}, {"kind": "malformed", "count": 1}]
    )
    chunks = await stream(aclient, "paced")
    assert (await anext(chunks)).choices[0].delta.role == "assistant"
    with pytest.raises(openai.APIConnectionError):
        await anext(chunks)
    with pytest.raises(openai.APIConnectionError):
        await aclient.chat.completions.create(model="m", messages=user("paced"))
    with pytest.raises(json.JSONDecodeError):
        [c async for c in await stream(aclient, "paced")]
    assert accumulate([c async for c in await stream(aclient, "paced")])["content"] == TEXT
    log = server.requests()
    assert [e["outcome"] for e in log] == ["fault:drop"] * 2 + ["fault:malformed", "served"]
    assert [e["rule"] for e in log] == ["paced"] * 4
    assert server.stats() == {"requests": 4, "served": 1, "faults": 3, "errors": 0}


async def test_errors_before_the_stream_are_plain(
    server: ScriptedModelServer, aclient: AsyncOpenAI
) -> None:
    server.set_faults([{"kind": "429", "count": 1, "retry_after": 2}, {"kind": 503, "count": 1}])
    with pytest.raises(openai.RateLimitError) as limited:
        await stream(aclient, "Please say hello")
    assert limited.value.response.headers["retry-after"] == "2"
    with pytest.raises(openai.InternalServerError) as unavailable:
        await stream(aclient, "Please say hello")
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.BadRequestError) as rejected:
        await stream(aclient, "trigger error")
    assert "scripted rejection" in rejected.value.message
    with pytest.raises(openai.BadRequestError) as misused:
        await aclient.chat.completions.create(
            model="m", messages=user("hi"), stream_options={"include_usage": True}
        )
    assert "stream_options" in misused.value.message
    assert server.stats() == {"requests": 4, "served": 0, "faults": 2, "errors": 2}


async def test_stop_drops_streams_under_way() -> None:
    s = ScriptedModelServer(STREAM_RULES)
    s.start()
    c = AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0)
    held = await stream(c, "half")
    await s.wait_held("mid")
    dawdling = await stream(c, "dawdle")  # its second chunk comes in ten minutes
    assert (await anext(dawdling)).choices[0].delta.role == "assistant"
    waiting = asyncio.create_task(c.chat.completions.create(model="m", messages=user("held whole")))
    await s.wait_held("start")
    await asyncio.to_thread(s.stop)
    for broken in (held, dawdling):
        with pytest.raises(openai.APIConnectionError):
            [chunk async for chunk in broken]
    with pytest.raises(openai.InternalServerError) as exc:  # not started: answered as before
        await waiting
    assert exc.value.status_code == 503


def test_stream_options_are_validated() -> None:
    with pytest.raises(RulesError, match="not streamed"):
        RuleSet.from_dict({"default": {"error": {"status": 500, "message": "x"}, "chunk_size": 3}})
    with pytest.raises(RulesError, match="kind"):
        RuleSet.from_dict({"default": {"content": "x", "break_after": {"kind": "explode"}}})
    with pytest.raises(RulesError, match="gate"):
        RuleSet.from_dict({"default": {"content": "x", "hold_after": {"chunks": 1}}})
