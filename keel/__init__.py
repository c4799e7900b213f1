"""Keel: AI agents that run durably on Temporal.

    from keel import Agent, tool, ToolContext, KeelPlugin, AgentClient

Define tools and agents, add `KeelPlugin(agents=[...])` to your Temporal client (its workers
then serve them beside your own workflows), and start and steer runs with `AgentClient`.
Loops of your own subclass `keel.workflows.KeelWorkflow`.

Everything else under `keel` is internal. Names load on first use, so workflow code that
imports `keel.workflows` never pulls in the model client, HTTP or database code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Agent": "keel.activities.registry",
    "Tool": "keel.activities.tools",
    "ToolContext": "keel.activities.tools",
    "tool": "keel.activities.tools",
    "AgentClient": "keel.client.api",
    "KeelClientError": "keel.client.api",
    "KeelPlugin": "keel.plugin",
    "ModelProvider": "keel.plugin",
    "Settings": "keel.config",
    "connect": "keel.config",
    "AgentWorkflow": "keel.workflows.agent",
    "KeelWorkflow": "keel.workflows.base",
    "EndRun": "keel.workflows.base",
    "AgentInput": "keel.workflows.models",
    "AgentResult": "keel.workflows.models",
    "AgentState": "keel.workflows.models",
    "AgentStatus": "keel.workflows.models",
    "ApprovalMode": "keel.workflows.models",
    "ApprovalPolicy": "keel.workflows.models",
    "ApprovalTimeoutAction": "keel.workflows.models",
    "Condition": "keel.workflows.models",
    "Limits": "keel.workflows.models",
    "MessagePolicy": "keel.workflows.models",
    "ModelSettings": "keel.workflows.models",
    "Policy": "keel.workflows.models",
    "load_policy": "keel.activities.registry",
    "sign_decision": "keel.client.signing",
    "RunEvent": "keel.workflows.events",
    "EventKind": "keel.workflows.events",
}

__all__ = [
    "Agent",
    "AgentClient",
    "AgentInput",
    "AgentResult",
    "AgentState",
    "AgentStatus",
    "AgentWorkflow",
    "ApprovalMode",
    "ApprovalPolicy",
    "ApprovalTimeoutAction",
    "Condition",
    "EndRun",
    "EventKind",
    "KeelClientError",
    "KeelPlugin",
    "KeelWorkflow",
    "Limits",
    "MessagePolicy",
    "ModelProvider",
    "ModelSettings",
    "Policy",
    "RunEvent",
    "Settings",
    "Tool",
    "ToolContext",
    "connect",
    "load_policy",
    "sign_decision",
    "tool",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from keel.activities.registry import Agent, load_policy
    from keel.activities.tools import Tool, ToolContext, tool
    from keel.client.api import AgentClient, KeelClientError
    from keel.client.signing import sign_decision
    from keel.config import Settings, connect
    from keel.plugin import KeelPlugin, ModelProvider
    from keel.workflows.agent import AgentWorkflow
    from keel.workflows.base import EndRun, KeelWorkflow
    from keel.workflows.events import EventKind, RunEvent
    from keel.workflows.models import (
        AgentInput,
        AgentResult,
        AgentState,
        AgentStatus,
        ApprovalMode,
        ApprovalPolicy,
        ApprovalTimeoutAction,
        Condition,
        Limits,
        MessagePolicy,
        ModelSettings,
        Policy,
    )
