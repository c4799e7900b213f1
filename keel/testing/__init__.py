"""Keel's test kit: run your agents in your own tests against a scripted model.

    from keel.testing import AgentEnvironment, start_local_temporal

    async with await start_local_temporal() as temporal:
        async with AgentEnvironment(temporal.client, AGENTS, "tests/rules.json") as env:
            result = await env.run("triage", "open a ticket: printer jammed")

The scripted model (`ScriptedModelServer`) speaks the OpenAI Chat Completions API over HTTP
and answers from rules (`RuleSet`; the file format is in docs/testing.md). It also serves on
its own: `python -m keel.testing.model_server --rules FILE --port 8765`.

Names load on first use, so the model server's process never imports Temporal's worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AgentEnvironment": "keel.testing.environment",
    "start_local_temporal": "keel.testing.environment",
    "ScriptedModelServer": "keel.testing.model_server",
    "RuleSet": "keel.testing.model_server",
    "Rule": "keel.testing.model_server",
    "Conditions": "keel.testing.model_server",
    "Reply": "keel.testing.model_server",
    "ToolCallSpec": "keel.testing.model_server",
    "ErrorSpec": "keel.testing.model_server",
    "FaultSpec": "keel.testing.model_server",
    "RulesError": "keel.testing.model_server",
}

__all__ = [
    "AgentEnvironment",
    "Conditions",
    "ErrorSpec",
    "FaultSpec",
    "Reply",
    "Rule",
    "RuleSet",
    "RulesError",
    "ScriptedModelServer",
    "ToolCallSpec",
    "start_local_temporal",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keel.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from keel.testing.environment import AgentEnvironment, start_local_temporal
    from keel.testing.model_server import (
        Conditions,
        ErrorSpec,
        FaultSpec,
        Reply,
        Rule,
        RulesError,
        RuleSet,
        ScriptedModelServer,
        ToolCallSpec,
    )
