"""The plain in-process loop: no durability at all, the floor every other system is above.

The same `AsyncOpenAI(max_retries=0)` chat-completion calls to the same endpoint, the same
tool schema and growing transcript, the tool function called directly.
"""

from __future__ import annotations

import json
from typing import Any

from openai import AsyncOpenAI

from bench.conversation import INSTRUCTIONS, MAX_STEPS, MODEL, TOOL_NAME, add, openai_tools


async def model_turn(client: AsyncOpenAI, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One model call: the assistant message, as the next request will carry it."""
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=openai_tools(),  # type: ignore[arg-type]
    )
    return completion.choices[0].message.model_dump(exclude_none=True)


def run_tools(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool results for a reply's tool calls."""
    out = []
    for call in reply.get("tool_calls") or []:
        fn = call["function"]
        result = add(**json.loads(fn["arguments"])) if fn["name"] == TOOL_NAME else "Error"
        out.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return out


async def run(client: AsyncOpenAI, prompt: str) -> str:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": prompt},
    ]
    for _ in range(MAX_STEPS):
        reply = await model_turn(client, messages)
        messages.append(reply)
        if not reply.get("tool_calls"):
            return str(reply.get("content") or "")
        messages += run_tools(reply)
    raise RuntimeError("plain loop ran out of steps")
