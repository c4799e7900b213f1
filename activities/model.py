"""The model call: OpenAI Chat Completions (or any compatible server), errors classified once."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import openai
from keel.activities.heartbeat import heartbeat_while
from keel.workflows import errors
from keel.workflows.models import CALL_MODEL, ChatMessage, ModelInput, ModelResult, ToolCall, Usage
from openai import AsyncOpenAI
from temporalio import activity
from temporalio.exceptions import ApplicationError

# Temporal refuses payloads past 2 MB; fail fast below that instead of retrying forever.
MAX_RESULT_BYTES = 1_500_000
RETRYABLE_STATUS = {408, 409, 429}
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


def classify(e: Exception) -> ApplicationError:
    """Translate an OpenAI SDK error into the one ApplicationError Temporal acts on."""
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        message = _provider_message(e)
        if status in RETRYABLE_STATUS or status >= 500:
            return ApplicationError(
                f"provider answered {status}: {message}",
                type=errors.PROVIDER_UNAVAILABLE,
                next_retry_delay=retry_after(e.response),
            )
        if status == 413:
            return ApplicationError(
                f"provider answered 413: {message}",
                type=errors.PAYLOAD_TOO_LARGE,
                non_retryable=True,
            )
        return ApplicationError(
            f"provider answered {status}: {message}",
            type=errors.PROVIDER_REJECTED,
            non_retryable=True,
        )
    if isinstance(e, openai.APIConnectionError):  # includes timeouts
        return ApplicationError(
            f"provider unreachable: {type(e).__name__}: {e}", type=errors.PROVIDER_UNAVAILABLE
        )
    return ApplicationError(
        f"provider sent a response that is not a chat completion: {type(e).__name__}: {e}",
        type=errors.PROVIDER_BAD_RESPONSE,
    )


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
        item: dict[str, Any] = {"role": m.role, "content": m.content}
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


class ModelActivities:
    """The `call_model` activity; the client comes from the worker's settings."""

    def __init__(self, base_url: str | None, api_key: str | None, default_model: str) -> None:
        self._base_url = base_url
        self._api_key = api_key or "not-needed"
        self._default_model = default_model
        self._clients: dict[tuple[str | None, float], AsyncOpenAI] = {}

    def _client(self, base_url: str | None, timeout: float) -> AsyncOpenAI:
        key = (base_url, timeout)
        if key not in self._clients:
            # Retries live in Temporal: the SDK must not retry behind its back.
            self._clients[key] = AsyncOpenAI(
                base_url=base_url, api_key=self._api_key, max_retries=0, timeout=timeout
            )
        return self._clients[key]

    @activity.defn(name=CALL_MODEL)
    async def call_model(self, input: ModelInput) -> ModelResult:
        """One chat completion with the agent's tools; usage recorded."""
        s = input.settings
        model = s.model or self._default_model
        client = self._client(s.base_url or self._base_url, s.timeout_seconds)
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": to_openai_messages(input.messages),
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
            # some compatible servers leave tools out unless asked to use them
            kwargs["tool_choice"] = input.tool_choice or "auto"
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        try:
            completion = await heartbeat_while(client.chat.completions.create(**kwargs))
            choice = completion.choices[0]
            msg = choice.message
            usage = completion.usage
            used = {t.id for m in input.messages for t in m.tool_calls}
            used.update(input.reserved_call_ids)
            result = ModelResult(
                message=ChatMessage(
                    role="assistant",
                    content=msg.content,
                    tool_calls=normalise_tool_calls(msg.tool_calls, input.step, used),
                ),
                usage=Usage(
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                    total_tokens=getattr(usage, "total_tokens", 0) or 0,
                ),
                finish_reason=choice.finish_reason or "",
                model=completion.model or model,
            )
        except (openai.APIError, ValueError, AttributeError, IndexError, TypeError) as e:
            # pydantic's ValidationError is a ValueError: a body of the wrong shape lands here
            raise classify(e) from e
        size = len(result.model_dump_json().encode())
        if size > MAX_RESULT_BYTES:
            raise ApplicationError(
                f"model reply is {size} bytes, over the {MAX_RESULT_BYTES}-byte payload limit",
                type=errors.PAYLOAD_TOO_LARGE,
                non_retryable=True,
            )
        return result
