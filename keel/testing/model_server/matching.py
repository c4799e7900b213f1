"""Matching rule conditions against a chat request, and substituting captured groups.

A request's messages are read as a ``_Conversation``; ``_Conversation.match`` checks a rule's
``Conditions`` and returns the named regex captures, which ``_substitute`` and
``_substitute_text`` put into ``{name}`` / ``{name:int}`` / ``{name:float}`` placeholders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rules import Conditions

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(int|float|str))?\}")


@cache
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


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
    model: str = ""

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
        model = body.get("model")
        return cls(
            messages=messages,
            tool_names=frozenset(names),
            model=model if isinstance(model, str) else "",
        )

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
        if when.model is not None and not search(when.model, [self.model]):
            return None
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
