"""All I/O: the model call, tool dispatch (tools and MCP servers), the agent registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keel.activities.fork import load_fork
from keel.activities.model import ModelActivities
from keel.activities.record import archive_record
from keel.activities.registry import Agent, AgentRegistry
from keel.activities.tools import Tool, ToolActivities, ToolContext, tool


def build_activities(
    registry: AgentRegistry, model: ModelActivities, resources: Any = None
) -> list[Callable[..., Any]]:
    """The activities a worker registers for these agents, bound to their config."""
    tools = ToolActivities(registry.tools(), resources, registry.mcp)
    return [
        registry.load_agent_spec,
        model.call_model,
        tools.run_tool,
        registry.mcp.list_tools,
        archive_record,
        load_fork,
    ]


__all__ = [
    "Agent",
    "AgentRegistry",
    "ModelActivities",
    "Tool",
    "ToolActivities",
    "ToolContext",
    "build_activities",
    "tool",
]
