"""The one conversation every system runs, and the fake endpoint's script for it.

"count to K": the model calls the read-only `add` tool K times, one call per model step,
then answers "Counted to K." That is K+1 model calls and K tool calls. A prompt may carry a
tag (` #tag`), which makes the fake endpoint report when each of that run's model requests
arrives, and a delay (` ~200ms`), which the endpoint waits before it answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INSTRUCTIONS = "You are a benchmark agent. Count with the add tool, then say you are done."
TOOL_NAME = "add"
TOOL_DESCRIPTION = "Add two integers."
TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
MAX_STEPS = 400  # every system's step budget: above the longest conversation measured
MODEL = "scripted"
PROMPT = re.compile(r"^count to (\d+)(?: #(\S+))?(?: ~(\d+)ms)?$")


def prompt(k: int, tag: str | None = None, delay_ms: int = 0) -> str:
    """The user's message for a K-step conversation (tagged: its arrivals are reported)."""
    text = f"count to {k}"
    if tag:
        text += f" #{tag}"
    if delay_ms:
        text += f" ~{delay_ms}ms"
    return text


def answer(k: int) -> str:
    return f"Counted to {k}."


def model_steps(k: int) -> int:
    """Model calls in a K-tool-step conversation: K that ask for a tool, one that answers."""
    return k + 1


def add(a: int, b: int) -> str:
    """The cheap read-only tool every system calls."""
    return json.dumps({"result": a + b})


def openai_tools() -> list[dict[str, Any]]:
    """The tool as Chat Completions `tools` (the plain loop and the hand-written loops)."""
    return [
        {
            "type": "function",
            "function": {
                "name": TOOL_NAME,
                "description": TOOL_DESCRIPTION,
                "parameters": TOOL_PARAMETERS,
            },
        }
    ]


class WrongAnswer(RuntimeError):
    """A run that did not end with the scripted answer: never counted as a fast run."""


def check(got: object, k: int, system: str) -> None:
    if got != answer(k):
        raise WrongAnswer(f"{system}: answered {got!r}, expected {answer(k)!r}")


@dataclass(frozen=True)
class Turn:
    """Where a chat request stands: the prompt it answers and the tool results so far."""

    k: int
    tag: str | None
    delay: float
    tool_results: int

    @property
    def done(self) -> bool:
        return self.tool_results >= self.k


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p if isinstance(p, str) else str(p.get("text", ""))
            for p in content
            if isinstance(p, str | Mapping)
        )
    return ""


def read_turn(messages: Sequence[Any]) -> Turn | None:
    """The turn a chat request is at, or None when its last user message is no prompt."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, Mapping) and m.get("role") == "user":
            found = PROMPT.match(_text(m.get("content")).strip())
            if found is None:
                return None
            results = sum(
                1 for x in messages[i + 1 :] if isinstance(x, Mapping) and x.get("role") == "tool"
            )
            k, tag, delay = found.groups()
            return Turn(int(k), tag, int(delay or 0) / 1000, results)
    return None
