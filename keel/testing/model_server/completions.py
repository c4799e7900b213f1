"""Response bodies: ``chat.completion`` objects, OpenAI-shaped errors, token estimates."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from .matching import _substitute, _substitute_text
from .rules import Reply

MODEL_ID = "scripted"


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
    403: ("You are not allowed to use this model.", "invalid_request_error", "forbidden"),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: (
        "Rate limit reached for requests. Please try again later.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}

MALFORMED_BODY = (
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
