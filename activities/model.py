"""The model call: OpenAI Chat Completions (or any compatible server), errors classified once."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion
from temporalio import activity
from temporalio.common import MetricCounter, MetricMeter
from temporalio.exceptions import ApplicationError

from keel.activities.heartbeat import annotate_span, heartbeat_while
from keel.activities.streaming import BadStream, Reply, StreamBroke, stream_reply
from keel.activities.transcripts import Transcripts
from keel.storage import TranscriptStore
from keel.workflows import errors
from keel.workflows.models import (
    CALL_MODEL,
    ChatMessage,
    ModelInput,
    ModelResult,
    ModelSettings,
    ToolCall,
    Usage,
)

# Temporal refuses payloads past 2 MB; fail fast below that instead of retrying forever.
MAX_RESULT_BYTES = 1_500_000
RETRYABLE_STATUS = {408, 409, 429}
CHAT_PATH = "/chat/completions"
log = logging.getLogger("keel.model")
MAX_RETRY_AFTER_SECONDS = 300.0  # a provider cannot park a run for longer than this


def retry_after(response: Any) -> timedelta | None:
    """The provider's Retry-After (seconds, or retry-after-ms), if it sent a sane one."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, unit in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = float(value) * unit
        except ValueError:
            continue  # an HTTP date, or garbage: let the retry policy decide
        if math.isfinite(seconds):
            return timedelta(seconds=min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS))
    return None


# A body that says the request itself is wrong, whatever the status (some compatible servers
# answer 500 to a request they cannot parse): retrying the same request cannot help.
INVALID_REQUEST = re.compile(
    r"\binvalid[_ ](request|argument|value|parameter|message|content|type)|\bbad request\b"
    r"|\bmust be (a|an|one of)\b|\bis not supported\b|\bfailed to parse\b",
    re.IGNORECASE,
)
CONTEXT_TOO_LONG = re.compile(
    r"context[_ ]length|maximum context|context window|too many tokens|prompt is too long",
    re.IGNORECASE,
)


def classify(e: Exception) -> ApplicationError:
    """Translate an OpenAI SDK error into the one ApplicationError Temporal acts on."""
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        message = f"provider answered {status}: {_provider_message(e)}"
        should_retry = _header(e.response, "x-should-retry")
        if CONTEXT_TOO_LONG.search(message) and status < 500:
            return _fatal(message, errors.CONTEXT_TOO_LONG)
        if status in (401, 403):
            return _fatal(message, errors.PROVIDER_AUTH)
        if status == 404:
            return _fatal(message, errors.MODEL_UNAVAILABLE)
        if status == 413:
            return _fatal(message, errors.PAYLOAD_TOO_LARGE)
        retryable = status in RETRYABLE_STATUS or status >= 500
        if should_retry == "false" or (status >= 500 and INVALID_REQUEST.search(message)):
            retryable = False
        elif should_retry == "true":
            retryable = True
        if not retryable:
            return _fatal(message, errors.PROVIDER_REJECTED)
        return ApplicationError(
            message, type=errors.PROVIDER_UNAVAILABLE, next_retry_delay=retry_after(e.response)
        )
    if isinstance(e, StreamBroke):  # mid-stream: the next attempt asks again
        return ApplicationError(
            f"the provider's stream broke off: {e}", type=errors.PROVIDER_UNAVAILABLE
        )
    if isinstance(e, openai.APIConnectionError):  # includes timeouts
        request = getattr(e, "request", None)
        at = f" at {shown_url(str(request.url))}" if request is not None else ""
        return ApplicationError(
            f"provider unreachable{at}: {type(e).__name__}: {e}", type=errors.PROVIDER_UNAVAILABLE
        )
    return ApplicationError(
        f"provider sent a response that is not a chat completion: {type(e).__name__}: {e}",
        type=errors.PROVIDER_BAD_RESPONSE,
    )


def shown_url(url: str) -> str:
    """A provider's base URL as messages and logs may show it: without the user and password
    it may carry, without its query (where some proxies take a key), and without the path
    of the call made to it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    netloc = f"{host}:{parts.port}" if parts.port else host
    path = parts.path.rstrip("/").removesuffix(CHAT_PATH).rstrip("/")
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def _fatal(message: str, type: str) -> ApplicationError:
    return ApplicationError(message, type=type, non_retryable=True)


def _header(response: Any, name: str) -> str:
    headers = getattr(response, "headers", None)
    return str(headers.get(name, "")).strip().lower() if headers is not None else ""


def _provider_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return e.message


def to_openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Our transcript in the Chat Completions wire format."""
    out: list[dict[str, Any]] = []
    for m in messages:
        # "" rather than null beside tool calls: some compatible servers refuse null
        item: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.role == "assistant" and m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m.tool_calls
            ]
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
            item["content"] = m.content or ""
        out.append(item)
    return out


def normalise_tool_calls(
    raw: list[Any] | None, step: int, used: set[str] | None = None
) -> list[ToolCall]:
    """Tolerate compatible servers' quirks: missing ids, ids repeated within a reply or
    across the run (approvals are keyed by them), non-string arguments."""
    if raw is not None and not isinstance(raw, list):
        raise TypeError(f"tool_calls must be a list, got {type(raw).__name__}")
    calls: list[ToolCall] = []
    seen: set[str] = set(used or ())
    for i, c in enumerate(raw or []):
        fn = getattr(c, "function", None)
        name = getattr(fn, "name", None) or ""
        args = getattr(fn, "arguments", None)
        if args is None:
            args = "{}"
        elif not isinstance(args, str):
            args = json.dumps(args)
        call_id = getattr(c, "id", None) or f"call_{step}_{i}"
        if call_id in seen:
            call_id = f"{call_id}_s{step}_{i}"
        seen.add(call_id)
        calls.append(ToolCall(id=call_id, name=name, arguments=args))
    return calls


class Pace:
    """At most `per_second` calls start each second in this process (0: no limit), spaced
    evenly: a worker's share of a provider's rate limit (KEEL_MODEL_CALLS_PER_SECOND). A
    call waiting its turn heartbeats, so it is not mistaken for a dead worker."""

    def __init__(
        self,
        per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()
        self._clock = clock
        self._sleep = sleep

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await self._sleep(start - now)


class ModelActivities:
    """The `call_model` activity; the client comes from the worker's settings."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        default_model: str,
        calls_per_second: float = 0.0,
        transcripts: TranscriptStore | None = None,
    ) -> None:
        self._base_url = base_url
        self._api_key = api_key or "not-needed"
        self._default_model = default_model
        self._clients: dict[tuple[str | None, str, float], AsyncOpenAI] = {}
        self._pace = Pace(calls_per_second)
        self.transcripts = Transcripts(transcripts)  # contexts sent by reference
        self._whole_only: set[tuple[str, str]] = set()  # (base URL, model): no streams
        self._said: set[tuple[tuple[str, str], object]] = set()  # said once in the log

    async def _ask(self, client: AsyncOpenAI, kwargs: dict[str, Any], input: ModelInput) -> Reply:
        """The reply, streamed when the run asked for it and the provider can; else whole."""
        where = (str(client.base_url), str(kwargs["model"]))
        if input.stream_id and where not in self._whole_only:
            try:
                return await heartbeat_while(stream_reply(client, kwargs, input.stream_id))
            except BadStream as e:  # a stream that is not one
                never, problem = e.never, str(e)
            except openai.APIStatusError as e:
                problem = f"{e.status_code}: {_provider_message(e)}"
                refused = e.status_code in (405, 415, 501) or (
                    400 <= e.status_code < 500 and "stream" in problem.lower()
                )
                if not refused:
                    raise  # what a whole request would meet too: asked once, not twice
                never = True
            completion = await heartbeat_while(self._whole(client, kwargs))
            if never:  # the whole request worked: this provider does not stream
                self._whole_only.add(where)
            if (where, never) not in self._said:
                self._said.add((where, never))
                log.warning(
                    "the provider at %s (model %s) %s (%s); Keel asks it for whole replies %s",
                    shown_url(where[0]),
                    where[1],
                    "does not stream replies" if never else "streamed a reply badly",
                    problem[:300],
                    "from now on" if never else "when that happens",
                )
            return Reply.of(completion)
        return Reply.of(await heartbeat_while(self._whole(client, kwargs)))

    def _estimate(self, client: AsyncOpenAI, kwargs: dict[str, Any], reply: Reply) -> Usage:
        """Tokens of a reply whose provider reported none (some compatible servers send no
        usage with a stream), at about four characters a token: token budgets keep counting."""
        where = (shown_url(str(client.base_url)), str(kwargs["model"]))
        if (where, "usage") not in self._said:
            self._said.add((where, "usage"))
            log.warning(
                "the provider at %s (model %s) reports no token usage; Keel estimates it "
                "(about 4 characters a token) so token budgets keep counting",
                *where,
            )
        asked = json.dumps(kwargs["messages"]) + json.dumps(kwargs.get("tools", []))
        said = (reply.text or "") + "".join(
            f"{c.function.name}{c.function.arguments}" for c in reply.raw_calls or []
        )
        prompt, completion = math.ceil(len(asked) / 4), math.ceil(len(said) / 4)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    async def _whole(self, client: AsyncOpenAI, kwargs: dict[str, Any]) -> ChatCompletion:
        # the body Keel built, sent as is: `chat.completions.create` would walk every
        # message against its typed params first (~0.2 ms a message, a fifth of a
        # worker's CPU at 40 messages); the errors and the response type are the same
        return await client.post(CHAT_PATH, body=kwargs, cast_to=ChatCompletion)

    def _client(self, s: ModelSettings) -> AsyncOpenAI:
        base_url = s.base_url or self._base_url
        api_key = os.environ.get(s.api_key_env, "") if s.api_key_env else self._api_key
        key = (base_url, api_key, s.timeout_seconds)
        if key not in self._clients:
            # Retries live in Temporal: the SDK must not retry behind its back.
            self._clients[key] = AsyncOpenAI(
                base_url=base_url,
                api_key=api_key or "not-needed",
                max_retries=0,
                timeout=s.timeout_seconds,
            )
        return self._clients[key]

    def _request(self, input: ModelInput, messages: list[ChatMessage]) -> dict[str, Any]:
        s = input.settings
        kwargs: dict[str, Any] = {
            "model": s.model or self._default_model,
            "messages": to_openai_messages(messages),
        }
        if input.tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters or {"type": "object", "properties": {}},
                    },
                }
                for t in input.tools
            ]
            # some compatible servers leave the tools out unless told they may be used
            kwargs["tool_choice"] = input.tool_choice or s.tool_choice or "auto"
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.max_tokens is not None:
            kwargs["max_tokens"] = s.max_tokens
        return kwargs

    @activity.defn(name=CALL_MODEL)
    async def call_model(self, input: ModelInput) -> ModelResult:
        """One chat completion with the agent's tools; usage recorded."""
        messages, stored = await heartbeat_while(self.transcripts.context(input))
        try:
            kwargs = self._request(input, messages)
            client = self._client(input.settings)
        except Exception as e:
            # nothing reached the provider: this is Keel's own bug, and retrying cannot help
            raise ApplicationError(
                f"Keel could not build the model request: {type(e).__name__}: {e}",
                type=errors.KEEL_INTERNAL,
                non_retryable=True,
            ) from e
        meter = activity.metric_meter().with_additional_attributes(
            {"agent": input.agent, "model": str(kwargs.get("model", ""))}
        )
        await heartbeat_while(self._pace.wait())  # this worker's share of the provider
        began = time.monotonic()
        try:
            reply = await self._ask(client, kwargs, input)
            usage = reply.usage
            used = {t.id for m in messages for t in m.tool_calls}
            used.update(input.reserved_call_ids)
            model = reply.model or kwargs["model"]
            result = ModelResult(
                message=ChatMessage(
                    role="assistant",
                    content=reply.text,
                    tool_calls=normalise_tool_calls(reply.raw_calls, input.step, used),
                    model=model,
                ),
                usage=Usage(
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                    total_tokens=getattr(usage, "total_tokens", 0) or 0,
                )
                if usage is not None
                else self._estimate(client, kwargs, reply),
                finish_reason=reply.finish_reason,
                model=model,
                attempt=activity.info().attempt,
                stored=stored,
            )
        except (
            openai.APIError,
            StreamBroke,
            ValueError,
            AttributeError,
            IndexError,
            TypeError,
        ) as e:
            # pydantic's ValidationError is a ValueError: a body of the wrong shape lands here
            failure = classify(e)
            annotate_span(
                {
                    "keel.agent": input.agent,
                    "keel.step": input.step,
                    "keel.attempt": activity.info().attempt,
                    "keel.error": failure.type or "error",
                }
            )
            _requests(meter).add(1, {"outcome": failure.type or "error"})
            raise failure from e
        elapsed = timedelta(seconds=time.monotonic() - began)
        annotate_span(
            {
                "keel.agent": input.agent,
                "keel.step": input.step,
                "keel.model": model,
                "keel.tokens": result.usage.total_tokens,
                "keel.attempt": activity.info().attempt,
                "keel.tool_calls": len(result.message.tool_calls),
            }
        )
        _requests(meter).add(1, {"outcome": "ok"})
        meter.create_histogram_timedelta(
            "keel_model_latency", "a model call, from request to reply", "ms"
        ).record(elapsed)
        tokens = meter.create_counter("keel_model_tokens", "tokens used")
        tokens.add(result.usage.prompt_tokens, {"kind": "prompt"})
        tokens.add(result.usage.completion_tokens, {"kind": "completion"})
        size = len(result.model_dump_json().encode())
        if size > MAX_RESULT_BYTES:
            raise ApplicationError(
                f"model reply is {size} bytes, over the {MAX_RESULT_BYTES}-byte payload limit",
                type=errors.PAYLOAD_TOO_LARGE,
                non_retryable=True,
            )
        return result


def _requests(meter: MetricMeter) -> MetricCounter:
    return meter.create_counter("keel_model_requests", "model calls, by outcome")
