"""Deterministic code only: the agent loop, its building blocks, payloads and policies."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so activities can import workflows.models without importing the loop
    # (which imports the activity definitions it schedules).
    if name == "WORKFLOWS":
        from workflows.agent import AgentWorkflow

        return [AgentWorkflow]
    raise AttributeError(name)
