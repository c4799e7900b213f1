"""Serve a team's agents: `keel worker --agents mypkg.agents:AGENTS` (or `python worker.py`).

Agents and the resources their tools get are named `module:attribute`, as uvicorn and
gunicorn name an app; the current directory is importable, as it is for them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from keel.activities.registry import Agent, with_subagents
from keel.config import Settings, SettingsError, connect
from keel.plugin import build_worker

log = logging.getLogger("keel.worker")


def load_object(ref: str, what: str) -> Any:
    """The object `module:attribute` names (attribute may be dotted), or a clear error."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SettingsError(f"{what} must be named module:attribute, got {ref!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise SettingsError(f"{what} {ref!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SettingsError(f"{what} {ref!r}: {module_name} has no {attr!r}") from None
    return obj


def load_agents(ref: str) -> list[Agent]:
    """The agents `ref` names: a list of Agent, one Agent, or a function returning either."""
    value = load_object(ref, "agents")
    if callable(value) and not isinstance(value, Agent):
        value = value()
    agents = [value] if isinstance(value, Agent) else value
    if not isinstance(agents, Sequence) or not all(isinstance(a, Agent) for a in agents):
        raise SettingsError(f"agents {ref!r} is not an Agent or a list of Agent")
    if not agents:
        raise SettingsError(f"agents {ref!r} is empty")
    return list(agents)


def load_workflows(ref: str | None) -> list[type]:
    """The workflow classes `ref` names: one class or a list of them."""
    if not ref:
        return []
    value = load_object(ref, "workflows")
    classes = [value] if inspect.isclass(value) else value
    if not isinstance(classes, Sequence) or not all(
        inspect.isclass(c) and hasattr(c, "__temporal_workflow_definition") for c in classes
    ):
        raise SettingsError(f"workflows {ref!r} is not a @workflow.defn class or a list of them")
    return list(classes)


def load_resources(ref: str | None) -> Any:
    """The resources `ref` names; a function (the factory) is called once, here."""
    if not ref:
        return None
    value = load_object(ref, "resources")
    if callable(value) and not inspect.isclass(value):
        value = value()
    return value


async def run_worker(
    settings: Settings,
    *,
    agents: str | None = None,
    resources: str | None = None,
    workflows: str | None = None,
) -> None:
    """Connect, and serve the named agents (and loops) on the settings' task queue until
    cancelled."""
    ref = agents or settings.agents
    if not ref:
        raise SettingsError(
            "name the agents to serve: keel worker --agents mypkg.agents:AGENTS "
            "(or set KEEL_AGENTS); the demo's are keel.activities.support:AGENTS"
        )
    served = load_agents(ref)
    loops = load_workflows(workflows or settings.workflows)
    res = load_resources(resources or settings.resources)
    client = await connect(settings)
    worker = build_worker(client, settings=settings, agents=served, resources=res, workflows=loops)
    log.info(
        "worker serving %s on task queue %s at %s",
        ", ".join(a.name for a in with_subagents(served)),
        settings.task_queue,
        settings.address,
    )
    await worker.run()
