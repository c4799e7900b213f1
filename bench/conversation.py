"""The one conversation every system runs, and the fake endpoint's script for it.

"count to K": the model calls the read-only `add` tool K times, one call per model step,
then answers "Counted to K." That is K+1 model calls and K tool calls. A prompt may carry a
tag (` #tag`), which makes the fake endpoint report when each of that run's model requests
arrives, a delay (` ~200ms`), which the endpoint waits before it answers, and a pace
(` over 300ms`): each reply is written over that time, streamed in chunks spread over it, or
sent whole once it has passed.

"write N pieces" (with the same tag, delay and pace) asks for no tool: the answer is a text
of N pieces of equal length, which a stream sends one piece a chunk (`story`).
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
_OPTIONS = r"(?: #(\S+))?(?: ~(\d+)ms)?(?: over (\d+)ms)?$"
PROMPT = re.compile(r"^count to (\d+)" + _OPTIONS)
STORY = re.compile(r"^write (\d+) pieces" + _OPTIONS)
PIECE = "Piece {:04d} of the story. "  # every piece as long as the others (below 10,000)


def _options(tag: str | None, delay_ms: int, over_ms: int) -> str:
    text = f" #{tag}" if tag else ""
    if delay_ms:
        text += f" ~{delay_ms}ms"
    if over_ms:
        text += f" over {over_ms}ms"
    return text


def prompt(k: int, tag: str | None = None, delay_ms: int = 0, over_ms: int = 0) -> str:
    """The user's message for a K-step conversation (tagged: its arrivals are reported)."""
    return f"count to {k}" + _options(tag, delay_ms, over_ms)


def story_prompt(pieces: int, tag: str | None = None, delay_ms: int = 0, over_ms: int = 0) -> str:
    """The user's message asking for `story(pieces)` as the answer, with no tool call."""
    return f"write {pieces} pieces" + _options(tag, delay_ms, over_ms)


def answer(k: int) -> str:
    return f"Counted to {k}."


def story(pieces: int) -> str:
    return "".join(PIECE.format(i) for i in range(pieces))


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
    over: float = 0.0  # seconds each reply takes to write (0: at once)
    pieces: int = 0  # a story of this many pieces is the answer (0: "count to K")

    @property
    def done(self) -> bool:
        return self.tool_results >= self.k

    @property
    def answer(self) -> str:
        return story(self.pieces) if self.pieces else answer(self.k)


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
            text = _text(m.get("content")).strip()
            counting = PROMPT.match(text)
            found = counting or STORY.match(text)
            if found is None:
                return None
            results = sum(
                1 for x in messages[i + 1 :] if isinstance(x, Mapping) and x.get("role") == "tool"
            )
            n, tag, delay, over = found.groups()
            k, pieces = (int(n), 0) if counting else (0, int(n))
            return Turn(k, tag, int(delay or 0) / 1000, results, int(over or 0) / 1000, pieces)
    return None
