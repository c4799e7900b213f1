"""The scripted model server, exercised with the real openai client."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from keel.testing.model_server import (
    SUPPORT_RULES,
    PortInUseError,
    RulesError,
    RuleSet,
    ScriptedModelServer,
    main,
)
from tests.rules import TEST_RULES

SUPPORT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("lookup_order", "issue_refund", "send_email")
]


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(TEST_RULES) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()


@pytest.fixture
def client(server: ScriptedModelServer) -> OpenAI:
    return OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=5)


@pytest.fixture
def aclient(server: ScriptedModelServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=5)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def calls(r: ChatCompletion) -> list[ChatCompletionMessageFunctionToolCall]:
    """The reply's tool calls (all function calls)."""
    raw = r.choices[0].message.tool_calls or []
    out = [c for c in raw if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert len(out) == len(raw)
    return out


def http(
    server: ScriptedModelServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(server.root_url + path, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def chat_raw(server: ScriptedModelServer, messages: list[Any]) -> dict[str, Any]:
    body = json.dumps({"model": "m", "messages": messages}).encode()
    status, _, payload = http(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and isinstance(payload, dict)
    return payload


# --------------------------------------------------------------------------- replies


async def test_text_reply(aclient: AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model="my-model", messages=user("Please say hello"))
    assert r.object == "chat.completion"
    assert r.model == "my-model"
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello!"
    assert not choice.message.tool_calls
    assert r.usage is not None
    assert r.usage.prompt_tokens >= 1 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_tool_call_with_typed_placeholders(aclient: AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model="m", messages=user("add 2 and 40 please"))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    found = calls(r)
    assert len(found) == 1
    assert found[0].id.startswith("call_")
    assert found[0].type == "function"
    assert found[0].function.name == "add"
    assert json.loads(found[0].function.arguments) == {"a": 2, "b": 40}


def test_content_is_null_beside_tool_calls(server: ScriptedModelServer) -> None:
    message = chat_raw(server, user("add 1 and 2"))["choices"][0]["message"]
    assert "content" in message and message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "add"


def test_tool_call_ids_are_deterministic(client: OpenAI) -> None:
    def ids(text: str) -> list[str]:
        r = client.chat.completions.create(model="m", messages=user(text))
        return [c.id for c in calls(r)]

    first = ids("give me two sums")
    assert len(first) == 2 and len(set(first)) == 2
    assert ids("give me two sums") == first
    assert ids("add 1 and 2") != ids("add 1 and 3")


def test_tool_result_round_trip(client: OpenAI) -> None:
    messages: list[Any] = user("add 2 and 3")
    r = client.chat.completions.create(model="m", messages=messages)
    call = calls(r)[0]
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"result": 5}'})
    r = client.chat.completions.create(model="m", messages=messages)
    assert r.choices[0].message.content == "The sum is 5."
    # A result for another tool is not taken for an `add` result.
    messages[-2]["tool_calls"][0]["function"]["name"] = "multiply"
    r = client.chat.completions.create(model="m", messages=messages)
    assert r.choices[0].message.content == 'Done: {"result": 5}'


def test_system_condition_and_default(client: OpenAI) -> None:
    pirate = [{"role": "system", "content": "You are a pirate."}, *user("say hello")]
    r = client.chat.completions.create(model="m", messages=pirate)
    assert r.choices[0].message.content == "Ahoy!"
    # no rule matches a conversation that ends with the assistant's turn
    ended = [*user("say hello"), {"role": "assistant", "content": "Hello!"}]
    r = client.chat.completions.create(model="m", messages=ended)
    assert r.choices[0].message.content == "I have no scripted reply for that."


def test_invalid_model_output(client: OpenAI) -> None:
    r = client.chat.completions.create(model="m", messages=user("broken json"))
    assert calls(r)[0].function.arguments == '{"a": 1,'
    r = client.chat.completions.create(model="m", messages=user("bad args"))
    args = calls(r)[0].function.arguments
    assert json.loads(args) == {"a": "not a number"}
    r = client.chat.completions.create(model="m", messages=user("call unknown tool"))
    assert calls(r)[0].function.name == "no_such_tool"


def test_tool_call_quirks(server: ScriptedModelServer) -> None:
    raw = chat_raw(server, user("quirky without ids"))["choices"][0]["message"]["tool_calls"]
    assert len(raw) == 2 and "id" not in raw[0] and "id" not in raw[1]
    message = chat_raw(server, user("quirky"))["choices"][0]["message"]
    assert len(message["tool_calls"]) == 2
    assert message["tool_calls"][0]["id"] == message["tool_calls"][1]["id"]
    assert message["content"] == "Let me add those."
    assert message["tool_calls"][0]["function"]["name"] == "add"


def test_literal_braces_survive(client: OpenAI) -> None:
    r = client.chat.completions.create(model="m", messages=user("literal braces"))
    assert r.choices[0].message.content == "Literal {braces} and {} and {{x}} stay."


def test_rule_error_reply(server: ScriptedModelServer, client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=user("trigger error"))
    assert exc.value.status_code == 400
    assert "scripted rejection" in exc.value.message
    assert server.stats() == {"requests": 1, "served": 0, "faults": 0, "errors": 1}
    assert server.requests()[0]["outcome"] == "error:400"


def test_float_placeholder_and_unknown_placeholder() -> None:
    rules = RuleSet.from_dict(
        {
            "rules": [
                {
                    "when": {"last_user": r"pay (?P<amount>[\d.]+)"},
                    "reply": {
                        "tool_calls": [
                            {
                                "name": "pay",
                                "arguments": {
                                    "amount": "{amount:float}",
                                    "note": ["paid {amount} of {missing}", "{missing:int}"],
                                },
                            }
                        ]
                    },
                }
            ]
        }
    )
    with ScriptedModelServer(rules) as s:
        c = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=5)
        r = c.chat.completions.create(model="m", messages=user("pay 12.5"))
        args = json.loads(calls(r)[0].function.arguments)
    assert args == {"amount": 12.5, "note": ["paid 12.5 of {missing}", "{missing:int}"]}


HELD = {
    "rules": [
        {
            "name": "held",
            "when": {"last_user": "wait"},
            "reply": {"hold": "g", "content": "at last"},
        }
    ],
    "default": {"content": "quick"},
}


async def test_a_held_reply_holds_no_other() -> None:
    with ScriptedModelServer(HELD) as s:
        c = AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        held = asyncio.create_task(c.chat.completions.create(model="m", messages=user("wait")))
        await s.wait_held("g")
        r = await c.chat.completions.create(model="m", messages=user("say hello"))
        assert r.choices[0].message.content == "quick"
        assert not held.done() and s.requests()[0]["outcome"] == "pending"
        s.release("g")
        assert (await held).choices[0].message.content == "at last"
        assert s.held("g") == 0
        # an open gate holds nothing more
        r = await c.chat.completions.create(model="m", messages=user("wait"))
        assert r.choices[0].message.content == "at last"
        assert s.stats() == {"requests": 3, "served": 3, "faults": 0, "errors": 0}


async def test_stop_answers_held_replies_and_frees_the_port() -> None:
    s = ScriptedModelServer(HELD)
    s.start()
    port = s.port
    c = AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0)
    held = asyncio.create_task(c.chat.completions.create(model="m", messages=user("wait")))
    await s.wait_held("g")
    await asyncio.to_thread(s.stop)
    with pytest.raises(openai.InternalServerError) as exc:
        await held
    assert exc.value.status_code == 503 and "stopping" in exc.value.message
    with pytest.raises(openai.APIConnectionError):
        await c.chat.completions.create(model="m", messages=user("say hello"))
    with ScriptedModelServer(HELD, port=port) as again:  # the port is free again
        r = OpenAI(base_url=again.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=user("say hello")
        )
        assert r.choices[0].message.content == "quick"


async def test_concurrent_requests(server: ScriptedModelServer, aclient: AsyncOpenAI) -> None:
    texts = [f"add {i} and {i}" if i % 2 else "say hello" for i in range(40)]
    replies = await asyncio.gather(
        *(aclient.chat.completions.create(model="m", messages=user(t)) for t in texts)
    )
    for i, r in enumerate(replies):
        if i % 2:
            assert json.loads(calls(r)[0].function.arguments) == {"a": i, "b": i}
        else:
            assert r.choices[0].message.content == "Hello!"
    assert server.stats() == {"requests": 40, "served": 40, "faults": 0, "errors": 0}
    assert sorted(e["seq"] for e in server.requests()) == list(range(40))


# --------------------------------------------------------------------------- faults


def test_429_with_retry_after(server: ScriptedModelServer, client: OpenAI) -> None:
    server.set_faults([{"kind": "429", "count": 1, "retry_after": 2}])
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="m", messages=user("say hello"))
    assert exc.value.status_code == 429
    assert exc.value.response.headers["retry-after"] == "2"
    assert isinstance(exc.value.body, dict) and exc.value.body["code"] == "rate_limit_exceeded"
    r = client.chat.completions.create(model="m", messages=user("say hello"))
    assert r.choices[0].message.content == "Hello!"
    assert server.stats() == {"requests": 2, "served": 1, "faults": 1, "errors": 0}


def test_server_errors(server: ScriptedModelServer, client: OpenAI) -> None:
    server.set_faults([{"kind": "500", "count": 1}, {"kind": 503, "count": 1, "retry_after": 0.5}])
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="m", messages=user("say hello"))
    assert exc.value.status_code == 500
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="m", messages=user("say hello"))
    assert exc.value.status_code == 503
    assert exc.value.response.headers["retry-after"] == "0.5"


def test_auth_and_bad_request_faults(server: ScriptedModelServer, client: OpenAI) -> None:
    server.set_faults([{"kind": "401", "count": 1}, {"kind": "400", "count": 1}])
    with pytest.raises(openai.AuthenticationError) as auth:
        client.chat.completions.create(model="m", messages=user("say hello"))
    assert "Incorrect API key provided" in auth.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=user("say hello"))
    assert "Invalid request" in bad.value.message


async def test_slow_fault_times_out(server: ScriptedModelServer, aclient: AsyncOpenAI) -> None:
    server.set_faults([{"kind": "slow", "count": 1, "delay": 600}])  # answers when it stops
    with pytest.raises(openai.APITimeoutError):
        await aclient.chat.completions.create(model="m", messages=user("say hello"), timeout=0.5)
    assert server.requests()[0]["outcome"] == "fault:slow"
    r = await aclient.chat.completions.create(model="m", messages=user("say hello"))
    assert r.choices[0].message.content == "Hello!"


def test_malformed_body(server: ScriptedModelServer, client: OpenAI) -> None:
    server.set_faults([{"kind": "malformed", "count": 1}])
    with pytest.raises((ValueError, openai.APIError)):
        client.chat.completions.create(model="m", messages=user("say hello"))
    assert server.stats()["faults"] == 1


def test_fault_when_condition(server: ScriptedModelServer, client: OpenAI) -> None:
    server.set_faults([{"kind": "500", "when": {"last_user": "(?i)hello"}}])
    r = client.chat.completions.create(model="m", messages=user("echo hi"))
    assert r.choices[0].message.content == "You said: echo hi"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=user("say hello"))


def test_rate_faults_are_deterministic(server: ScriptedModelServer, client: OpenAI) -> None:
    def pattern() -> list[bool]:
        server.set_faults([{"kind": "500", "rate": 0.5, "seed": 7}])
        out = []
        for _ in range(12):
            try:
                client.chat.completions.create(model="m", messages=user("say hello"))
                out.append(False)
            except openai.InternalServerError:
                out.append(True)
        return out

    rng = random.Random(7)
    expected = [rng.random() < 0.5 for _ in range(12)]
    first = pattern()
    assert first == expected
    assert pattern() == first
    assert any(first) and not all(first)


def test_faults_from_rules_file_are_active_at_start() -> None:
    rules = RuleSet.from_dict(
        {"default": {"content": "ok"}, "faults": [{"kind": 429, "count": 1, "retry_after": 1}]}
    )
    with ScriptedModelServer(rules) as s:
        c = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=5)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="m", messages=user("hi"))
        assert c.chat.completions.create(model="m", messages=user("hi")).choices[0].message.content
        assert s.faults()[0]["remaining"] == 0


# --------------------------------------------------------------------------- admin & HTTP


def test_stats_and_request_log(server: ScriptedModelServer, client: OpenAI) -> None:
    client.chat.completions.create(model="m", messages=user("say hello"))
    server.set_faults([{"kind": "429", "count": 1}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=user("add 1 and 2"))
    client.chat.completions.create(model="m", messages=user("add 1 and 2"))
    assert server.stats() == {"requests": 3, "served": 2, "faults": 1, "errors": 0}
    log = server.requests()
    assert [e["seq"] for e in log] == [0, 1, 2]
    assert [e["outcome"] for e in log] == ["served", "fault:429", "served"]
    assert [e["rule"] for e in log] == ["hello", None, "add"]
    assert log[0]["body"]["messages"] == user("say hello")
    status, _, over_http = http(server, "GET", "/admin/requests")
    assert status == 200 and over_http == log
    server.reset()
    assert server.stats() == {"requests": 0, "served": 0, "faults": 0, "errors": 0}
    assert server.requests() == [] and server.faults() == []


def test_admin_over_http(server: ScriptedModelServer, client: OpenAI) -> None:
    faults = json.dumps([{"kind": "500", "count": 1}]).encode()
    assert http(server, "POST", "/admin/faults", faults)[0] == 200
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=user("say hello"))
    status, _, stats = http(server, "GET", "/admin/stats")
    assert status == 200
    assert stats == {"requests": 1, "served": 0, "faults": 1, "errors": 0}
    status, _, err = http(server, "POST", "/admin/faults", b'[{"kind": "418"}]')
    assert status == 400 and "kind" in err["error"]["message"]
    assert http(server, "POST", "/admin/reset", b"")[0] == 200
    assert http(server, "GET", "/admin/stats")[2]["requests"] == 0


def test_models_endpoint(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["scripted"]


def test_unknown_path_and_bad_json(server: ScriptedModelServer) -> None:
    status, _, body = http(server, "GET", "/v1/nope")
    assert status == 404
    assert set(body["error"]) >= {"message", "type", "code"}
    status, _, body = http(server, "GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    status, _, body = http(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert server.stats()["requests"] == 1 and server.requests()[0]["outcome"] == "error:400"


def test_port_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError) as exc:
            ScriptedModelServer(RuleSet(), port=port).start()
        assert isinstance(exc.value, OSError)
        assert str(port) in str(exc.value)
        assert main(["--rules", str(SUPPORT_RULES), "--port", str(port)]) == 1


def test_invalid_rules_are_reported() -> None:
    with pytest.raises(RulesError, match="regex"):
        RuleSet.from_dict({"rules": [{"when": {"last_user": "("}, "reply": {"content": "x"}}]})
    with pytest.raises(RulesError, match="typo"):
        RuleSet.from_dict({"rules": [{"when": {"typo": "x"}, "reply": {"content": "x"}}]})
    ok = RuleSet.from_dict({"_comment": "fine", "rules": []})
    assert ok.rules == []


# --------------------------------------------------------------------------- support.json


def test_support_refund_conversation() -> None:
    results = {
        "lookup_order": {
            "order_id": "A-1001",
            "customer": "Ann",
            "email": "ann@example.com",
            "item": "Teapot",
            "total": 59.99,
            "status": "delivered",
            "refunded": 0.0,
        },
        "issue_refund": {
            "refund_id": "R-77",
            "order_id": "A-1001",
            "amount": 59.99,
            "status": "refunded",
        },
        "send_email": {"email_id": "E-0001", "to": "ann@example.com", "status": "queued"},
    }
    made: list[tuple[str, dict[str, Any]]] = []
    messages: list[Any] = [
        {"role": "system", "content": "You are a support agent."},
        *user("Hi, my order A-1001 arrived broken. Can I get a refund?"),
    ]
    with ScriptedModelServer(RuleSet.load(SUPPORT_RULES)) as s:
        c = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=5)
        for _ in range(6):
            r = c.chat.completions.create(model="m", messages=messages, tools=SUPPORT_TOOLS)
            message = r.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                break
            for call in calls(r):
                made.append((call.function.name, json.loads(call.function.arguments)))
                result = json.dumps(results[call.function.name])
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    assert [name for name, _ in made] == ["lookup_order", "issue_refund", "send_email"]
    assert made[0][1] == {"order_id": "A-1001"}
    assert made[1][1]["order_id"] == "A-1001" and made[1][1]["amount"] == 59.99
    assert made[1][1]["reason"]
    assert made[2][1]["to"] == "ann@example.com"
    assert "R-77" in made[2][1]["subject"] + made[2][1]["body"]
    final = messages[-1]["content"]
    assert "R-77" in final and "59.99" in final


@pytest.mark.parametrize(
    "result",
    [
        '{"error": "no order A-1001"}',
        "Rejected by alice: too large",
        "Error: tool add failed",
        '{"order_id": "A-1001", "status": "refunded", "total": 5, "email": "a@b.c"}',
    ],
)
def test_support_stops_on_errors_and_refunded_orders(result: str) -> None:
    messages: list[Any] = [
        *user("Hi, my order A-1001 arrived broken. Can I get a refund?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1001"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": result},
    ]
    with ScriptedModelServer(RuleSet.load(SUPPORT_RULES)) as s:
        c = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=5)
        r = c.chat.completions.create(model="m", messages=messages, tools=SUPPORT_TOOLS)
    assert not r.choices[0].message.tool_calls
    content = (r.choices[0].message.content or "").lower()
    assert "sorry" in content or "already been refunded" in content


def test_support_status_question() -> None:
    with ScriptedModelServer(RuleSet.load(SUPPORT_RULES)) as s:
        c = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=5)
        messages: list[Any] = user("What's the status of order B-2002?")
        r = c.chat.completions.create(model="m", messages=messages, tools=SUPPORT_TOOLS)
        call = calls(r)[0]
        assert call.function.name == "lookup_order"
        assert json.loads(call.function.arguments) == {"order_id": "B-2002"}
        messages.append(r.choices[0].message.model_dump(exclude_none=True))
        lookup = {"order_id": "B-2002", "status": "shipped", "total": 10, "email": "b@example.com"}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(lookup)})
        r = c.chat.completions.create(model="m", messages=messages, tools=SUPPORT_TOOLS)
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].message.content is not None
    assert "B-2002" in r.choices[0].message.content and "shipped" in r.choices[0].message.content
