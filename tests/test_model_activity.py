"""The model activity's pure parts: Retry-After, tool-call normalisation."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from keel.activities.model import MAX_RETRY_AFTER_SECONDS, normalise_tool_calls, retry_after


def response(**headers: str) -> SimpleNamespace:
    return SimpleNamespace(headers=headers)


def test_retry_after_is_honoured_within_bounds() -> None:
    assert retry_after(response(**{"retry-after": "2"})) == timedelta(seconds=2)
    assert retry_after(response(**{"retry-after-ms": "1500"})) == timedelta(seconds=1.5)
    cap = timedelta(seconds=MAX_RETRY_AFTER_SECONDS)
    assert retry_after(response(**{"retry-after": "1e12"})) == cap
    assert retry_after(response(**{"retry-after": "inf"})) is None
    assert retry_after(response(**{"retry-after": "-5"})) == timedelta(0)
    assert retry_after(response(**{"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"})) is None
    assert retry_after(None) is None


def call(id: str | None, name: str = "add", arguments: object = "{}") -> SimpleNamespace:
    return SimpleNamespace(id=id, function=SimpleNamespace(name=name, arguments=arguments))


def test_tool_call_ids_are_unique_across_the_run() -> None:
    calls = normalise_tool_calls([call(None), call("c"), call("c"), call("old")], 3, {"old"})
    ids = [c.id for c in calls]
    assert len(set(ids)) == 4 and "old" not in ids
    assert ids[0] == "call_3_0" and ids[1] == "c"


def test_non_string_arguments_become_json() -> None:
    (c,) = normalise_tool_calls([call("x", arguments={"a": 1})], 1)
    assert c.arguments == '{"a": 1}'
