"""Deterministic code only: the agent loop, its building blocks, payloads and policies.

Nothing here imports `keel.activities`: activities are scheduled by name."""

from __future__ import annotations

from keel.workflows.agent import AgentWorkflow
from keel.workflows.base import EndRun, KeelWorkflow

# What a worker registers (KeelPlugin adds them to any worker).
WORKFLOWS: list[type] = [AgentWorkflow]

__all__ = ["WORKFLOWS", "AgentWorkflow", "EndRun", "KeelWorkflow"]
