"""Keel's test kit: run your agents in your own tests against a scripted model.

    from keel.testing import AgentEnvironment, start_local_temporal

    async with await start_local_temporal() as temporal:
        async with AgentEnvironment(temporal.client, AGENTS, "tests/rules.json") as env:
            result = await env.run("triage", "open a ticket: printer jammed")

The scripted model (`ScriptedModelServer`) speaks the OpenAI Chat Completions API over HTTP
and answers from rules (`RuleSet`; the file format is in docs/testing.md). It also serves on
its own: `python -m keel.testing.model_server --rules FILE --port 8765`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keel.testing.model_server import (
    BreakAfter,
    Conditions,
    ErrorSpec,
    FaultSpec,
    HoldAfter,
    Reply,
    Rule,
    RulesError,
    RuleSet,
    ScriptedModelServer,
    ToolCallSpec,
)

__all__ = [
    "AgentEnvironment",
    "BreakAfter",
    "Conditions",
    "ErrorSpec",
    "FaultSpec",
    "HoldAfter",
    "Reply",
    "Rule",
    "RuleSet",
    "RulesError",
    "ScriptedModelServer",
    "ToolCallSpec",
    "start_local_temporal",
]


def __getattr__(name: str) -> Any:
    # these load Temporal's worker and the rest of Keel (seconds): only when asked for, so
    # the model server's own process (python -m keel.testing.model_server) never does
    if name in ("AgentEnvironment", "start_local_temporal"):
        from keel.testing import environment

        return getattr(environment, name)
    raise AttributeError(f"module 'keel.testing' has no attribute {name!r}")


if TYPE_CHECKING:
    from keel.testing.environment import AgentEnvironment, start_local_temporal
