"""A completion as OpenAI streams it: ``chat.completion.chunk`` objects, text in pieces.

The chunks are cut from the very ``chat.completion`` a non-streamed request gets, so the two
carry the same id, text, tool calls and usage, and a client that accumulates the chunks ends
with the message it would have been sent whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

WORDS_PER_PIECE = 3

DONE = "[DONE]"

# a chunk's JSON cut off where a network or a provider's proxy might cut it
MALFORMED_CHUNK = (
    '{"id": "chatcmpl-malformed", "object": "chat.completion.chunk", "created": 0, '
    '"model": "scripted", "choices": [{"index": 0, "delta": {"content": "This piece was cut'
)

_WORD = re.compile(r"\s*\S+")


def pieces(text: str, size: int | None = None) -> list[str]:
    """`text` in pieces of `size` characters, or of a few words (with the spaces before
    them, as a tokenizer splits them); joined, they are `text` again."""
    if not text:
        return []
    if size is not None:
        return [text[i : i + size] for i in range(0, len(text), size)]
    words = _WORD.findall(text)
    out = ["".join(words[i : i + WORDS_PER_PIECE]) for i in range(0, len(words), WORDS_PER_PIECE)]
    rest = text[sum(len(w) for w in words) :]  # trailing whitespace
    if rest:
        if out:
            out[-1] += rest
        else:
            out.append(rest)
    return out


def completion_chunks(
    completion: Mapping[str, Any], size: int | None = None, include_usage: bool = False
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects that stream `completion`: the role, the text in
    pieces, each tool call's header then its arguments in pieces, the finish reason, and with
    `include_usage` a last chunk with no choices and the usage (every other one has
    ``"usage": null``, as OpenAI sends them)."""
    choice = completion["choices"][0]
    message = choice["message"]
    content: str | None = message.get("content")
    calls: list[dict[str, Any]] = message.get("tool_calls") or []

    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": "" if content is not None else None, "refusal": None}
    ]
    deltas.extend({"content": p} for p in pieces(content or "", size))
    for i, call in enumerate(calls):
        header = {k: v for k, v in call.items() if k in ("id", "type")}
        function = call["function"]
        deltas.append(
            {
                "tool_calls": [
                    {"index": i, **header, "function": {"name": function["name"], "arguments": ""}}
                ]
            }
        )
        deltas.extend(
            {"tool_calls": [{"index": i, "function": {"arguments": p}}]}
            for p in pieces(function["arguments"], size)
        )
    if content is None and len(deltas) > 1:
        # OpenAI sends the first call's header in the role chunk when there is no text
        deltas[:2] = [{**deltas[0], **deltas[1]}]

    base = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
        "system_fingerprint": completion.get("system_fingerprint"),
    }
    usage: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        entry = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**base, "choices": [entry], **usage}

    out = [chunk(d) for d in deltas]
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        out.append({**base, "choices": [], "usage": completion["usage"]})
    return out
