"""The scripted model's rules for Keel's own tests (stateless: matched on the conversation).

A dict in the rules file's shape (docs/testing.md), so tests can add rules of their own in front."""

from __future__ import annotations

from typing import Any

STORY = (
    "Once upon a time a keel kept a small boat upright through a long storm, and the sailors slept."
)
TEST_RULES: dict[str, Any] = {
    "rules": [
        {
            "name": "tool problem",
            "when": {
                "last_role": "tool",
                "last_tool_result": "^(?P<error>(?:Error|Rejected|Interrupted)[^\\n]*)",
            },
            "reply": {"content": "The tool reported: {error}"},
        },
        {
            "name": "loop",
            "when": {"any_user": "(?i)loop forever"},
            "reply": {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]},
        },
        {
            "name": "grow",
            "when": {"any_user": "(?i)grow big"},
            "reply": {"tool_calls": [{"name": "blob", "arguments": {"size": 400000}}]},
        },
        {
            # a reply written in pieces that stops at the gate "story" after three chunks
            # (the role chunk and two pieces), until the test releases it
            "name": "story",
            "when": {"last_role": "user", "last_user": "(?i)^tell a story"},
            "reply": {
                "content": STORY,
                "chunk_size": 12,
                "hold_after": {"gate": "story", "chunks": 3},
            },
        },
        {
            "name": "slow loop",
            "when": {"any_user": "(?i)slow loop"},
            "reply": {
                "delay": 0.8,
                "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 2}}],
            },
        },
        {
            "name": "a lot",
            "when": {"last_role": "user", "last_user": "(?i)say a lot"},
            "reply": {"content": "y" * 1_400_000},
        },
        {
            "name": "nap",
            "when": {"last_role": "user", "last_user": "(?i)take a long nap"},
            "reply": {"tool_calls": [{"name": "nap", "arguments": {"seconds": 600}}]},
        },
        {
            "name": "crm",
            "when": {"last_role": "user", "last_user": "(?i)use the crm"},
            "reply": {"tool_calls": [{"name": "crm", "arguments": {}}]},
        },
        {
            "name": "snoop",
            "when": {"last_role": "user", "last_user": "(?i)snoop"},
            "reply": {"tool_calls": [{"name": "snoop", "arguments": {}}]},
        },
        {
            "name": "held tool",
            "when": {"last_role": "user", "last_user": "(?i)hold the tool"},
            "reply": {"tool_calls": [{"name": "held", "arguments": {}}]},
        },
        {
            "name": "always silent",
            "when": {"any_user": "(?i)stay silent"},
            "reply": {"content": ""},
        },
        {
            "name": "silent once",
            "when": {"last_role": "user", "last_user": "(?i)say nothing"},
            "reply": {"content": ""},
        },
        {
            "name": "delegate to shop",
            "when": {"last_role": "user", "last_user": "(?i)^delegate (?P<task>.+)$"},
            "reply": {"tool_calls": [{"name": "ask_shop", "arguments": {"task": "{task}"}}]},
        },
        {
            "name": "delegate to calc",
            "when": {"last_role": "user", "last_user": "(?i)^compute (?P<task>.+)$"},
            "reply": {"tool_calls": [{"name": "ask_calc", "arguments": {"task": "{task}"}}]},
        },
        {
            "name": "crash step 2",
            "when": {"any_user": "crash test", "last_role": "tool", "last_tool_name": "charge"},
            "reply": {
                "hold": "crash",  # held until the test has killed the worker
                "tool_calls": [{"name": "add", "arguments": {"a": 20, "b": 22}}],
            },
        },
        {
            "name": "crash step 1",
            "when": {"last_role": "user", "last_user": "crash test"},
            "reply": {"tool_calls": [{"name": "charge", "arguments": {"amount": 10}}]},
        },
        {
            "name": "sum",
            "when": {
                "last_role": "tool",
                "last_tool_name": "add",
                "last_tool_result": '"result": (?P<result>-?\\d+)',
            },
            "reply": {"content": "The sum is {result}."},
        },
        {
            "name": "after tool",
            "when": {"last_role": "tool", "last_tool_result": "(?s)(?P<output>.*)"},
            "reply": {"content": "Done: {output}"},
        },
        {
            "name": "pirate hello",
            "when": {"last_role": "user", "system": "(?i)pirate", "last_user": "(?i)say hello"},
            "reply": {"content": "Ahoy!"},
        },
        {
            "name": "hello",
            "when": {"last_role": "user", "last_user": "(?i)say hello"},
            "reply": {"content": "Hello!"},
        },
        {
            "name": "two sums",
            "when": {"last_role": "user", "last_user": "(?i)two sums"},
            "reply": {
                "tool_calls": [
                    {"name": "add", "arguments": {"a": 1, "b": 2}},
                    {"name": "add", "arguments": {"a": 3, "b": 4}},
                ]
            },
        },
        {
            "name": "model error",
            "when": {"last_role": "user", "last_user": "(?i)trigger error"},
            "reply": {"error": {"status": 400, "message": "Invalid request: scripted rejection"}},
        },
        {
            "name": "braces",
            "when": {"last_role": "user", "last_user": "(?i)literal braces"},
            "reply": {"content": "Literal {braces} and {} and {{x}} stay."},
        },
        {
            "name": "add",
            "when": {"last_role": "user", "last_user": "(?i)add (?P<a>-?\\d+) and (?P<b>-?\\d+)"},
            "reply": {
                "tool_calls": [{"name": "add", "arguments": {"a": "{a:int}", "b": "{b:int}"}}]
            },
        },
        {
            "name": "unknown tool",
            "when": {"last_role": "user", "last_user": "(?i)call unknown tool"},
            "reply": {"tool_calls": [{"name": "no_such_tool", "arguments": {}}]},
        },
        {
            "name": "bad args",
            "when": {"last_role": "user", "last_user": "(?i)bad args"},
            "reply": {"tool_calls": [{"name": "add", "arguments": {"a": "not a number"}}]},
        },
        {
            "name": "broken json",
            "when": {"last_role": "user", "last_user": "(?i)broken json"},
            "reply": {"tool_calls": [{"name": "add", "raw_arguments": '{"a": 1,'}]},
        },
        {
            "name": "quirks without ids",
            "when": {"last_role": "user", "last_user": "(?i)quirky without ids"},
            "reply": {
                "tool_calls": [
                    {"name": "add", "arguments": {"a": 1, "b": 1}},
                    {"name": "add", "arguments": {"a": 2, "b": 2}},
                ],
                "omit_tool_call_ids": True,
            },
        },
        {
            "name": "quirks",
            "when": {"last_role": "user", "last_user": "(?i)quirky"},
            "reply": {
                "tool_calls": [
                    {"name": "add", "arguments": {"a": 1, "b": 1}},
                    {"name": "add", "arguments": {"a": 2, "b": 2}},
                ],
                "duplicate_tool_call_ids": True,
                "content_with_tool_calls": "Let me add those.",
            },
        },
        {
            "name": "flaky",
            "when": {"last_role": "user", "last_user": "(?i)try the flaky tool"},
            "reply": {"tool_calls": [{"name": "flaky", "arguments": {}}]},
        },
        {
            "name": "charge as text",
            "when": {"last_role": "user", "last_user": "(?i)charge as text"},
            "reply": {"tool_calls": [{"name": "charge", "arguments": {"amount": "100"}}]},
        },
        {
            "name": "charge two",
            "when": {"last_role": "user", "last_user": "(?i)charge twice"},
            "reply": {
                "tool_calls": [
                    {"name": "charge", "arguments": {"amount": 30, "note": "first"}},
                    {"name": "charge", "arguments": {"amount": 5, "note": "small"}},
                ]
            },
        },
        {
            "name": "charge",
            "when": {"last_role": "user", "last_user": "(?i)charge (?P<amount>\\d+(?:\\.\\d+)?)"},
            "reply": {
                "tool_calls": [
                    {"name": "charge", "arguments": {"amount": "{amount:float}", "note": "test"}}
                ]
            },
        },
        {
            "name": "slow think",
            "when": {"last_role": "user", "last_user": "(?i)think slowly"},
            "reply": {"hold": "slow", "content": "finally"},  # held: a model call in flight
        },
        {
            "name": "a moment",
            "when": {"last_role": "user", "last_user": "(?i)take a moment"},
            "reply": {"hold": "moment", "content": "Moment taken."},  # until the test releases it
        },
        {
            "name": "short tool",
            "when": {"last_role": "user", "last_user": "(?i)wait a bit"},
            "reply": {"tool_calls": [{"name": "slow_lookup", "arguments": {"seconds": 3}}]},
        },
        {
            "name": "slow tools",
            "when": {"last_role": "user", "last_user": "(?i)use slow tools"},
            "reply": {
                "tool_calls": [
                    {"name": "slow_lookup", "arguments": {"seconds": 60}},
                    {"name": "slow_email", "arguments": {"seconds": 2}},
                ]
            },
        },
        {
            "name": "echo",
            "when": {"last_role": "user", "last_user": "(?is)^(?P<text>.*)$"},
            "reply": {"content": "You said: {text}"},
        },
    ],
    "default": {"content": "I have no scripted reply for that."},
}
