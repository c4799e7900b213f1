"""The rules file schema: conditions, replies, fault specs and the ``RuleSet`` itself.

Rules files are JSON (docs/testing.md); keys starting with ``_`` are comments, any other
unknown key is an error. ``SUPPORT_RULES`` is the demo's file, the one ``keel dev`` serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .matching import _compile, _Conversation

SUPPORT_RULES = Path(__file__).resolve().parents[2] / "demo" / "rules.json"

FaultKind = Literal["429", "500", "503", "400", "401", "403", "404", "slow", "malformed", "drop"]
BreakKind = Literal["drop", "malformed"]

# Chunks a streamed reply sends before it pauses or breaks, unless told: the role chunk and
# the first piece, so a client holds some text of a reply it will not get whole.
CHUNKS_BEFORE = 2
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class RulesError(ValueError):
    """A rules file or fault spec that cannot be loaded."""


class _Strict(BaseModel):
    """Unknown keys are errors, except keys starting with ``_`` (comments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_comments(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("_"))}
        return data


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
    model: str | None = None  # a regex on the request's model name

    @field_validator(
        "last_user", "last_tool_result", "system", "any_user", "any_tool_result", "model"
    )
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


class HoldAfter(_Strict):
    """A streamed reply pauses at the gate ``gate`` once it has sent ``chunks`` chunks."""

    gate: str
    chunks: int = Field(default=CHUNKS_BEFORE, ge=0)


class BreakAfter(_Strict):
    """A streamed reply breaks once it has sent ``chunks`` chunks: ``drop`` closes the
    connection, ``malformed`` sends a chunk whose JSON is cut off."""

    kind: BreakKind
    chunks: int = Field(default=CHUNKS_BEFORE, ge=0)


class Reply(_Strict):
    """What the model answers: text, tool calls or an error, optionally after a delay; a
    streamed answer is paced, held half-written or broken by the ``chunk_*``, ``hold_after``
    and ``break_after`` options."""

    content: str | None = None
    tool_calls: list[ToolCallSpec] | None = None
    delay: float = Field(default=0.0, ge=0)
    # a named gate: the reply waits until the gate is released (``release(name)``), so a
    # test acts while a model call is surely in flight, with no timing window
    hold: str | None = None
    omit_tool_call_ids: bool = False
    duplicate_tool_call_ids: bool = False
    content_with_tool_calls: str | None = None
    error: ErrorSpec | None = None
    # characters a streamed piece of text or arguments holds (None: a few words), and
    # seconds between chunks (0: as fast as the client reads)
    chunk_size: int | None = Field(default=None, ge=1)
    chunk_delay: float = Field(default=0.0, ge=0)
    hold_after: HoldAfter | None = None
    break_after: BreakAfter | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Reply:
        if self.error is not None and (self.content is not None or self.tool_calls):
            raise ValueError("an error reply cannot also have 'content' or 'tool_calls'")
        streamed = (
            self.chunk_size is not None
            or self.chunk_delay
            or self.hold_after is not None
            or self.break_after is not None
        )
        if self.error is not None and streamed:
            raise ValueError(
                "an error reply is not streamed: it has no 'chunk_*', 'hold_after' or 'break_after'"
            )
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
    should_retry: bool | None = None  # sent as the x-should-retry header, as OpenAI does
    chunks: int = Field(default=CHUNKS_BEFORE, ge=0)  # a stream's chunks before drop/malformed

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
