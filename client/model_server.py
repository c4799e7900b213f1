"""A scripted model server speaking the OpenAI Chat Completions API over HTTP.

It is Keel's offline default model and the model used in tests. Replies come from a rules
file: each rule has conditions on the conversation in the request (stateless, so many concurrent
runs can share one server) and a reply (text, tool calls, an error, optionally delayed). Faults
(429/500/503/400/401, slow replies, malformed bodies) can be injected by count or by a seeded
rate, from the rules file, over HTTP (``POST /admin/faults``) or from Python (``set_faults``).

Run it in the foreground with ``python -m client.model_server --rules FILE --port 8765``.
"""

from __future__ import annotations

import argparse
import copy
import errno
import hashlib
import json
import math
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "RULES_DIR",
    "SUPPORT_RULES",
    "TEST_RULES",
    "MODEL_ID",
    "Conditions",
    "ErrorSpec",
    "FaultSpec",
    "PortInUseError",
    "Reply",
    "Rule",
    "RuleSet",
    "RulesError",
    "ScriptedModelServer",
    "ServerBindError",
    "ToolCallSpec",
    "main",
]

RULES_DIR = Path(__file__).resolve().parent / "rules"
SUPPORT_RULES = RULES_DIR / "support.json"
TEST_RULES = RULES_DIR / "test.json"
MODEL_ID = "scripted"

FaultKind = Literal["429", "500", "503", "400", "401", "slow", "malformed"]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(int|float|str))?\}")


class RulesError(ValueError):
    """A rules file or fault spec that cannot be loaded."""


class ServerBindError(OSError):
    """The server could not bind its address; the message names host and port."""


class PortInUseError(ServerBindError):
    """The port is already taken."""


# --------------------------------------------------------------------------- rules schema


class _Strict(BaseModel):
    """Unknown keys are errors, except keys starting with ``_`` (comments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_comments(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("_"))}
        return data


@cache
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class Conditions(_Strict):
    """All given conditions must hold; regexes use ``re.search`` and may capture named groups."""

    last_role: Role | None = None
    last_user: str | None = None
    last_tool_result: str | None = None
    last_tool_name: str | None = None
    system: str | None = None
    any_user: str | None = None
    any_tool_result: str | None = None
    tool_results_since_user: int | None = Field(default=None, ge=0)
    has_tool: str | None = None

    @field_validator("last_user", "last_tool_result", "system", "any_user", "any_tool_result")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                _compile(value)
            except re.error as e:
                raise ValueError(f"invalid regex {value!r}: {e}") from e
        return value


class ToolCallSpec(_Strict):
    """One tool call in a reply: ``arguments`` (object, placeholders substituted) or
    ``raw_arguments`` (string sent verbatim, e.g. invalid JSON)."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    raw_arguments: str | None = None

    @model_validator(mode="after")
    def _one_kind_of_arguments(self) -> ToolCallSpec:
        if self.raw_arguments is not None and self.arguments:
            raise ValueError("give either 'arguments' or 'raw_arguments', not both")
        return self


class ErrorSpec(_Strict):
    """An error reply in OpenAI's error shape."""

    status: int = Field(ge=400, le=599)
    message: str
    type: str | None = None
    code: str | None = None


class Reply(_Strict):
    """What the model answers: text, tool calls or an error, optionally after a delay."""

    content: str | None = None
    tool_calls: list[ToolCallSpec] | None = None
    delay: float = Field(default=0.0, ge=0)
    omit_tool_call_ids: bool = False
    duplicate_tool_call_ids: bool = False
    content_with_tool_calls: str | None = None
    error: ErrorSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Reply:
        if self.error is not None and (self.content is not None or self.tool_calls):
            raise ValueError("an error reply cannot also have 'content' or 'tool_calls'")
        if self.tool_calls and self.content is not None:
            raise ValueError(
                "'content' is sent as null beside tool calls; "
                "use 'content_with_tool_calls' to send text alongside them"
            )
        quirks = (
            self.omit_tool_call_ids
            or self.duplicate_tool_call_ids
            or self.content_with_tool_calls is not None
        )
        if quirks and not self.tool_calls:
            raise ValueError("tool call quirk flags need 'tool_calls'")
        return self


class Rule(_Strict):
    name: str = ""
    when: Conditions = Field(default_factory=Conditions)
    reply: Reply


class FaultSpec(_Strict):
    """A fault injected before rules: on the next ``count`` matching requests, or on each
    matching request with probability ``rate`` (``random.Random(seed)``); with neither, on
    every matching request."""

    kind: FaultKind
    count: int | None = Field(default=None, ge=0)
    rate: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int = 0
    retry_after: float | None = Field(default=None, ge=0)
    delay: float = Field(default=30.0, ge=0)
    when: Conditions | None = None
    message: str | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _count_or_rate(self) -> FaultSpec:
        if self.count is not None and self.rate is not None:
            raise ValueError("give either 'count' or 'rate', not both")
        return self


class RuleSet(_Strict):
    """The scripted model: rules (first match wins), a default reply, and start-up faults."""

    rules: list[Rule] = Field(default_factory=list)
    default: Reply = Field(default_factory=lambda: Reply(content="I have no scripted reply."))
    faults: list[FaultSpec] = Field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuleSet:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RulesError(f"invalid rules: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise RulesError(f"cannot read rules file {p}: {e}") from e
        except json.JSONDecodeError as e:
            raise RulesError(f"rules file {p} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise RulesError(f"rules file {p} must hold a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RulesError(f"invalid rules file {p}: {e}") from e

    def select(self, body: Mapping[str, Any]) -> tuple[Rule | None, Reply, dict[str, str]]:
        """The first rule matching this chat request (None: the default) and its captures."""
        conv = _Conversation.from_body(body)
        for rule in self.rules:
            captures = conv.match(rule.when)
            if captures is not None:
                return rule, rule.reply, captures
        return None, self.default, {}


def parse_faults(specs: Iterable[FaultSpec | Mapping[str, Any]]) -> list[FaultSpec]:
    """Validate fault specs given as dicts (or already parsed)."""
    out: list[FaultSpec] = []
    for i, s in enumerate(specs):
        if isinstance(s, FaultSpec):
            out.append(s)
            continue
        try:
            out.append(FaultSpec.model_validate(s))
        except ValidationError as e:
            raise RulesError(f"invalid fault spec #{i}: {e}") from e
    return out


# --------------------------------------------------------------------------- matching


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return json.dumps(content)


@dataclass(frozen=True)
class _Message:
    role: str
    text: str
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class _Conversation:
    messages: list[_Message]
    tool_names: frozenset[str]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> _Conversation:
        raw_messages = body.get("messages") or []
        messages = [
            _Message(role=str(m.get("role", "")), text=_text(m.get("content")), raw=m)
            for m in raw_messages
            if isinstance(m, Mapping)
        ]
        names: set[str] = set()
        for t in body.get("tools") or []:
            if isinstance(t, Mapping):
                fn = t.get("function")
                name = fn.get("name") if isinstance(fn, Mapping) else None
                if isinstance(name, str):
                    names.add(name)
        return cls(messages=messages, tool_names=frozenset(names))

    def _last_user_index(self) -> int | None:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                return i
        return None

    def _last_tool(self) -> _Message | None:
        if self.messages and self.messages[-1].role == "tool":
            return self.messages[-1]
        return None

    def _last_tool_name(self) -> str | None:
        last = self._last_tool()
        if last is None:
            return None
        call_id = last.raw.get("tool_call_id")
        if call_id:
            for m in reversed(self.messages[:-1]):
                if m.role != "assistant":
                    continue
                for call in m.raw.get("tool_calls") or []:
                    if isinstance(call, Mapping) and call.get("id") == call_id:
                        fn = call.get("function")
                        name = fn.get("name") if isinstance(fn, Mapping) else None
                        if isinstance(name, str):
                            return name
        name = last.raw.get("name")
        return name if isinstance(name, str) else None

    def match(self, when: Conditions) -> dict[str, str] | None:
        """Named captures if every condition holds, else None."""
        caps: dict[str, str] = {}

        def search(pattern: str, texts: Iterable[str]) -> bool:
            regex = _compile(pattern)
            for t in texts:
                m = regex.search(t)
                if m:
                    caps.update({k: v for k, v in m.groupdict().items() if v is not None})
                    return True
            return False

        msgs = self.messages
        if when.last_role is not None and (not msgs or msgs[-1].role != when.last_role):
            return None
        if when.has_tool is not None and when.has_tool not in self.tool_names:
            return None
        if when.tool_results_since_user is not None:
            start = self._last_user_index()
            since = msgs[(start + 1 if start is not None else 0) :]
            if sum(1 for m in since if m.role == "tool") != when.tool_results_since_user:
                return None
        if when.last_tool_name is not None and self._last_tool_name() != when.last_tool_name:
            return None
        if when.system is not None:
            systems = [m.text for m in msgs if m.role in ("system", "developer")]
            if not search(when.system, ["\n".join(systems)] if systems else []):
                return None
        if when.any_user is not None:
            users = [m.text for m in msgs if m.role == "user"]
            if not search(when.any_user, users):
                return None
        if when.any_tool_result is not None:
            results = [m.text for m in reversed(msgs) if m.role == "tool"]
            if not search(when.any_tool_result, results):
                return None
        if when.last_user is not None:
            idx = self._last_user_index()
            if idx is None or not search(when.last_user, [msgs[idx].text]):
                return None
        if when.last_tool_result is not None:
            last = self._last_tool()
            if last is None or not search(when.last_tool_result, [last.text]):
                return None
        return caps


def _substitute_text(text: str, caps: Mapping[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        value = caps.get(m.group(1))
        return m.group(0) if value is None else value

    return _PLACEHOLDER.sub(repl, text)


def _convert(value: str, kind: str) -> Any:
    try:
        if kind == "int":
            try:
                return int(value)
            except ValueError:
                number = float(value)
                return int(number) if number.is_integer() else value
        if kind == "float":
            return float(value)
    except ValueError:
        return value
    return value


def _substitute(value: Any, caps: Mapping[str, str]) -> Any:
    """Placeholders replaced in string values, recursively; ``"{n:int}"`` alone gives a number."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(2) in ("int", "float") and whole.group(1) in caps:
            return _convert(caps[whole.group(1)], whole.group(2))
        return _substitute_text(value, caps)
    if isinstance(value, Mapping):
        return {k: _substitute(v, caps) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, caps) for v in value]
    return value


# --------------------------------------------------------------------------- responses


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _short_hash(*parts: str, length: int = 24) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:length]


def _estimate_tokens(value: Any) -> int:
    return max(1, math.ceil(len(_canonical(value)) / 4))


_DEFAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request: scripted fault", "invalid_request_error", None),
    401: (
        "Incorrect API key provided: sk-***. You can find your API key in your account settings.",
        "invalid_request_error",
        "invalid_api_key",
    ),
    404: ("Not found", "invalid_request_error", "not_found"),
    429: (
        "Rate limit reached for requests. Please try again later.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}

_MALFORMED_BODY = (
    b'{"id": "chatcmpl-malformed", "object": "chat.completion", "created": 0, '
    b'"model": "scripted", "choices": [{"index": 0, "message": {"role": "assistant", '
    b'"content": "This reply was cut off in the midd'
)


def _error_type(status: int) -> str:
    if status in _DEFAULT_ERRORS:
        return _DEFAULT_ERRORS[status][1]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    status: int, message: str | None = None, type: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    default_message, default_type, default_code = _DEFAULT_ERRORS.get(
        status, (f"Error {status}", _error_type(status), None)
    )
    return {
        "error": {
            "message": message or default_message,
            "type": type or default_type,
            "param": None,
            "code": code if code is not None else default_code,
        }
    }


@dataclass
class _HttpReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> _HttpReply:
        return cls(status, json.dumps(payload).encode("utf-8"), dict(headers or {}))

    @classmethod
    def error(
        cls,
        status: int,
        message: str | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> _HttpReply:
        return cls.json(status, error_body(status, message, type, code), headers)


def build_completion(
    body: Mapping[str, Any], reply: Reply, captures: Mapping[str, str]
) -> dict[str, Any]:
    """A ``chat.completion`` object for a (non-error) reply to this request."""
    messages = body.get("messages") or []
    conversation = _canonical(messages)
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if reply.tool_calls:
        calls: list[dict[str, Any]] = []
        for i, spec in enumerate(reply.tool_calls):
            if spec.raw_arguments is not None:
                arguments = spec.raw_arguments
            else:
                arguments = json.dumps(_substitute(spec.arguments, captures))
            call: dict[str, Any] = {
                "type": "function",
                "function": {"name": spec.name, "arguments": arguments},
            }
            if not reply.omit_tool_call_ids:
                index = 0 if reply.duplicate_tool_call_ids else i
                call = {"id": "call_" + _short_hash(conversation, str(index)), **call}
            calls.append(call)
        message["tool_calls"] = calls
        if reply.content_with_tool_calls is not None:
            message["content"] = _substitute_text(reply.content_with_tool_calls, captures)
        finish_reason = "tool_calls"
    else:
        message["content"] = _substitute_text(reply.content or "", captures)
        finish_reason = "stop"
    prompt_tokens = _estimate_tokens(messages)
    completion_tokens = _estimate_tokens(message)
    return {
        "id": "chatcmpl-" + _short_hash(conversation, "completion"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or MODEL_ID),
        "system_fingerprint": "fp_scripted",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# --------------------------------------------------------------------------- server


@dataclass
class _FaultState:
    spec: FaultSpec
    remaining: int | None
    rng: random.Random

    @classmethod
    def of(cls, spec: FaultSpec) -> _FaultState:
        return cls(spec=spec, remaining=spec.count, rng=random.Random(spec.seed))

    def fires(self) -> bool:
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True
        if self.spec.rate is not None:
            return self.rng.random() < self.spec.rate
        return True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_port = False  # a second server on a taken port must fail, not share it

    def __init__(self, address: tuple[str, int], owner: ScriptedModelServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "KeelScriptedModel/1.0"
    protocol_version = "HTTP/1.0"
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _path(self) -> str:
        path = urlsplit(self.path).path
        return path.rstrip("/") or "/"

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, reply: _HttpReply | None) -> None:
        if reply is None:  # server stopping: drop the connection without an answer
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Connection", "close")
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired)
        self.close_connection = True

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self._path()
        if path in ("/v1/models", "/models"):
            self._send(_HttpReply.json(200, {"object": "list", "data": [_model_card()]}))
        elif path in (f"/v1/models/{MODEL_ID}", f"/models/{MODEL_ID}"):
            self._send(_HttpReply.json(200, _model_card()))
        elif path == "/admin/stats":
            self._send(_HttpReply.json(200, owner.stats()))
        elif path == "/admin/requests":
            self._send(_HttpReply.json(200, owner.requests()))
        elif path == "/admin/faults":
            self._send(_HttpReply.json(200, owner.faults()))
        elif path in ("/", "/health", "/healthz"):
            self._send(_HttpReply.json(200, {"status": "ok", "url": owner.url}))
        else:
            self._send(_not_found(self.command, path))

    def do_POST(self) -> None:
        owner = self.server.owner
        path = self._path()
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            self._send(_HttpReply.error(400, "Invalid request: unreadable request body"))
            return
        if path in ("/v1/chat/completions", "/chat/completions"):
            self._send(owner._chat(raw))
        elif path == "/admin/faults":
            try:
                data = json.loads(raw or b"[]")
                if isinstance(data, Mapping):
                    data = data.get("faults", [])
                if not isinstance(data, list):
                    raise RulesError("expected a JSON list of fault specs")
                owner.set_faults(data)
            except (ValueError, RulesError) as e:
                self._send(_HttpReply.error(400, f"Invalid request: {e}"))
                return
            self._send(_HttpReply.json(200, {"ok": True, "faults": len(data)}))
        elif path == "/admin/reset":
            owner.reset()
            self._send(_HttpReply.json(200, {"ok": True}))
        else:
            self._send(_not_found(self.command, path))

    def _method_not_allowed(self) -> None:
        self._send(
            _HttpReply.error(405, f"Method {self.command} not allowed", "invalid_request_error")
        )

    do_PUT = _method_not_allowed
    do_DELETE = _method_not_allowed
    do_PATCH = _method_not_allowed


def _model_card() -> dict[str, Any]:
    return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "keel"}


def _not_found(method: str, path: str) -> _HttpReply:
    return _HttpReply.error(
        404, f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
    )


class ScriptedModelServer:
    """The scripted model on a background ``ThreadingHTTPServer``.

    >>> with ScriptedModelServer(RuleSet.load(TEST_RULES)) as server:
    ...     client = AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0)
    """

    def __init__(
        self,
        rules: RuleSet,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
    ) -> None:
        self._rules = rules
        self._host = host
        self._requested_port = port
        self.verbose = verbose
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requests = 0
        self._served = 0
        self._faults_count = 0
        self._errors = 0
        self._generation = 0
        self._log: list[dict[str, Any]] = []
        self._faults: list[_FaultState] = [_FaultState.of(f) for f in rules.faults]

    # ---- lifecycle

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises PortInUseError if the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("scripted model server already started")
        self._stopping.clear()
        try:
            httpd = _HTTPServer((self._host, self._requested_port), self)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                msg = (
                    f"cannot start the scripted model server: port {self._requested_port} "
                    f"on {self._host} is already in use; choose another port"
                )
            else:
                msg = (
                    f"cannot start the scripted model server on "
                    f"{self._host}:{self._requested_port}: {e.strerror or e}"
                )
            error = PortInUseError if e.errno == errno.EADDRINUSE else ServerBindError
            exc = error(msg)
            exc.errno = e.errno
            raise exc from e
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"scripted-model-server:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; replies still sleeping (delays, slow faults) are dropped."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ScriptedModelServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the requested one."""
        if self._httpd is not None:
            return int(self._httpd.server_address[1])
        return self._requested_port

    @property
    def root_url(self) -> str:
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"{self.root_url}/v1"

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rules (active faults are kept)."""
        self._rules = rules

    # ---- admin

    def stats(self) -> dict[str, int]:
        """``requests`` received, ``served`` (200 completions from rules), ``faults`` injected,
        ``errors`` (invalid requests and rule error replies)."""
        with self._lock:
            return {
                "requests": self._requests,
                "served": self._served,
                "faults": self._faults_count,
                "errors": self._errors,
            }

    def requests(self) -> list[dict[str, Any]]:
        """Chat requests in arrival order: ``{"seq", "body", "outcome", "rule"}``."""
        with self._lock:
            return copy.deepcopy(self._log)

    def faults(self) -> list[dict[str, Any]]:
        """The active fault specs, with ``remaining`` counts."""
        with self._lock:
            return [
                {**f.spec.model_dump(exclude_none=True), "remaining": f.remaining}
                for f in self._faults
            ]

    def set_faults(self, faults: Iterable[FaultSpec | Mapping[str, Any]]) -> None:
        """Replace the active faults (counts and random streams start afresh)."""
        states = [_FaultState.of(f) for f in parse_faults(faults)]
        with self._lock:
            self._faults = states

    def reset(self) -> None:
        """Clear counters, the request log and the active faults."""
        with self._lock:
            self._requests = self._served = self._faults_count = self._errors = 0
            self._log = []
            self._faults = []
            self._generation += 1  # requests still in flight no longer count

    # ---- the chat endpoint

    def _finish(self, entry: dict[str, Any], generation: int, outcome: str, counter: str) -> None:
        with self._lock:
            entry["outcome"] = outcome
            if generation != self._generation:
                return
            if counter == "served":
                self._served += 1
            elif counter == "errors":
                self._errors += 1

    def _chat(self, raw: bytes) -> _HttpReply | None:
        try:
            body: Any = json.loads(raw.decode("utf-8"))
            parsed = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {"_invalid_json": raw[:2000].decode("utf-8", errors="replace")}
            parsed = False
        with self._lock:
            self._requests += 1
            seq = len(self._log)
            generation = self._generation
            entry: dict[str, Any] = {"seq": seq, "body": body, "outcome": "pending", "rule": None}
            self._log.append(entry)
        headers = {"x-request-id": f"req_scripted_{seq}"}

        problem: str | None = None
        if not parsed:
            problem = (
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)"
            )
        elif not isinstance(body, dict):
            problem = "Invalid request: the body must be a JSON object."
        elif not isinstance(body.get("messages"), list) or not all(
            isinstance(m, dict) for m in body["messages"]
        ):
            problem = "Invalid request: 'messages' must be a list of message objects."
        elif body.get("stream"):
            problem = "Invalid request: streaming is not supported by the scripted model server."
        if problem is not None:
            self._finish(entry, generation, "error:400", "errors")
            return _HttpReply.error(400, problem, headers=headers)

        conv = _Conversation.from_body(body)
        fault: FaultSpec | None = None
        with self._lock:
            for state in self._faults:
                if state.spec.when is not None and conv.match(state.spec.when) is None:
                    continue
                if state.fires():
                    fault = state.spec
                    if generation == self._generation:
                        self._faults_count += 1
                    entry["outcome"] = f"fault:{fault.kind}"
                    break

        if fault is not None:
            if fault.kind == "malformed":
                return _HttpReply(200, _MALFORMED_BODY, headers)
            if fault.kind == "slow":
                if self._stopping.wait(fault.delay):
                    return None
            else:
                status = int(fault.kind)
                if fault.retry_after is not None and status in (429, 503):
                    ra = fault.retry_after
                    headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
                return _HttpReply.error(status, fault.message, headers=headers)

        rule, reply, captures = self._rules.select(body)
        with self._lock:
            entry["rule"] = rule.name if rule is not None else "default"
        if reply.delay and self._stopping.wait(reply.delay):
            return None
        if reply.error is not None:
            err = reply.error
            if fault is None:
                self._finish(entry, generation, f"error:{err.status}", "errors")
            return _HttpReply.error(
                err.status, _substitute_text(err.message, captures), err.type, err.code, headers
            )
        completion = build_completion(body, reply, captures)
        if fault is None:
            self._finish(entry, generation, "served", "served")
        return _HttpReply.json(200, completion, headers)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.model_server",
        description="Serve a scripted model over the OpenAI Chat Completions API.",
    )
    parser.add_argument(
        "--rules", default=str(SUPPORT_RULES), help="rules JSON file (default: %(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind (%(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every HTTP request")
    args = parser.parse_args(argv)
    try:
        rules = RuleSet.load(args.rules)
    except RulesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = ScriptedModelServer(rules, host=args.host, port=args.port, verbose=args.verbose)
    try:
        server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"Scripted model server listening on {server.url} "
        f"({len(rules.rules)} rules from {args.rules}); Ctrl-C to stop",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    stats = server.stats()
    print(
        f"stopped after {stats['requests']} requests "
        f"({stats['served']} served, {stats['faults']} faults)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
