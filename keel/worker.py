"""Serve a team's agents: `keel worker --agents mypkg.agents:AGENTS` (or `python worker.py`).

Agents, the resources their tools get, and loops and activities of the team's own are named
`module:attribute`, as uvicorn and gunicorn name an app; the current directory is importable,
as it is for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from keel.activities.mcp_client import close_connections
from keel.activities.registry import Agent, AgentDefinitionError, with_subagents
from keel.activities.tools import ToolActivities
from keel.config import Settings, SettingsError, connect, env_number
from keel.loops import check_activities, workflow_name
from keel.plugin import HEARTBEAT_THROTTLE, KeelPlugin, ModelProvider
from keel.workflows import WORKFLOWS

log = logging.getLogger("keel.worker")
CONNECT_PATIENCE = 60.0  # seconds a starting worker waits for the server


@dataclass(frozen=True)
class WorkerOptions:
    """How a `keel worker` process runs (KEEL_WORKER_* variables).

    On SIGTERM (or SIGINT) the worker stops taking work and gives the activities in flight
    `graceful_seconds` to finish; what is still running then is cancelled and retried by
    another worker (Temporal's own retry), so nothing is lost either way. The health
    endpoint answers 200 while the worker serves and 503 once it is stopping."""

    graceful_seconds: float = 30.0
    health_port: int | None = None
    health_host: str = "127.0.0.1"
    max_concurrent_activities: int | None = None
    max_concurrent_workflow_tasks: int | None = None
    connect_seconds: float = CONNECT_PATIENCE  # how long a starting worker waits for Temporal

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerOptions:
        env = os.environ if env is None else env
        return cls(
            graceful_seconds=env_number(env, "KEEL_WORKER_GRACEFUL_SECONDS", float, 30.0),
            health_port=env_number(env, "KEEL_WORKER_HEALTH_PORT", int),
            health_host=env.get("KEEL_WORKER_HEALTH_HOST") or "127.0.0.1",
            max_concurrent_activities=env_number(env, "KEEL_WORKER_MAX_ACTIVITIES", int),
            max_concurrent_workflow_tasks=env_number(env, "KEEL_WORKER_MAX_WORKFLOW_TASKS", int),
            connect_seconds=env_number(env, "KEEL_WORKER_CONNECT_SECONDS", float, CONNECT_PATIENCE),
        )

    def worker_options(self) -> dict[str, Any]:
        """The Temporal `Worker` options these settings give."""
        options: dict[str, Any] = {
            "graceful_shutdown_timeout": timedelta(seconds=self.graceful_seconds)
        }
        if self.max_concurrent_activities:
            options["max_concurrent_activities"] = self.max_concurrent_activities
        if self.max_concurrent_workflow_tasks:
            # Temporal needs at least two: one for the sticky queue, one for the normal
            options["max_concurrent_workflow_tasks"] = max(2, self.max_concurrent_workflow_tasks)
        return options


class HealthEndpoint:
    """`GET /healthz` (or `/`): 200 and what the worker serves while it serves; 503 while it
    shuts down. A few lines of HTTP/1.1 on asyncio, for a load balancer or Kubernetes probe."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.stopping = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        try:
            self._server = await asyncio.start_server(self._answer, host, port)
        except OSError as e:
            raise SettingsError(f"health endpoint: cannot listen on {host}:{port}: {e}") from e
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = line.decode("latin-1").split()
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b""):
                pass  # the headers: nothing in them changes the answer
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                code, body = 405, {"error": "GET /healthz"}
            elif parts[1].split("?")[0] not in ("/", "/healthz"):
                code, body = 404, {"error": f"no {parts[1]}; GET /healthz"}
            elif self.stopping:
                code, body = 503, {**self.info, "status": "stopping"}
            else:
                code, body = 200, {**self.info, "status": "serving"}
            data = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                code, "Service Unavailable"
            )
            head = (
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if parts[:1] == ["HEAD"] else data))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()


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
    except AgentDefinitionError as e:  # an agent in it refused as it was made
        raise SettingsError(f"{what} {ref!r}: {e}") from None
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
        try:
            value = value()
        except AgentDefinitionError as e:  # an agent the function made was refused
            raise SettingsError(f"agents {ref!r}: {e}") from None
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


def load_activities(ref: str | None) -> list[Any]:
    """The activities `ref` names: one @activity.defn callable or a list of them."""
    if not ref:
        return []
    value = load_object(ref, "activities")
    found = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not found or not all(
        callable(f) and hasattr(f, "__temporal_activity_definition") for f in found
    ):
        raise SettingsError(
            f"activities {ref!r} is not an @activity.defn function or a list of them"
        )
    return list(found)


def load_resources(ref: str | None) -> Any:
    """The resources `ref` names; a function (the factory) is called once, here."""
    if not ref:
        return None
    value = load_object(ref, "resources")
    if callable(value) and not inspect.isclass(value):
        value = value()
    return value


ROLES = ("all", "workflows", "model", "tools")


def build_workers(
    client: Client,
    settings: Settings,
    *,
    agents: Sequence[Agent],
    resources: Any = None,
    workflows: Sequence[type] = (),
    activities: Sequence[Any] = (),
    role: str = "all",
    worker_options: Mapping[str, Any] | None = None,
) -> list[Worker]:
    """The workers a `keel worker` process runs: the runs (workflows, with the `activities`
    the team's own call) on the settings' task queue, and, when KEEL_MODEL_TASK_QUEUE /
    KEEL_TOOL_TASK_QUEUE are set, the model calls and the tool calls on queues of their own,
    so slow tools cannot starve model calls. `role` picks which of these this process serves
    (`all`, `workflows`, `model`, `tools`). A workflow that calls an activity none of these
    serve is refused, where its code names the activity plainly."""
    if role not in ROLES:
        raise SettingsError(f"--role is one of {', '.join(ROLES)}, not {role!r}")
    queue = {"model": settings.model_task_queue, "tools": settings.tool_task_queue}
    if role in queue and not queue[role]:
        env = "KEEL_MODEL_TASK_QUEUE" if role == "model" else "KEEL_TOOL_TASK_QUEUE"
        raise SettingsError(f"--role {role} serves the queue {env} names: set it")
    options = dict(worker_options or {})
    plugin = KeelPlugin(agents, resources=resources, settings=settings)
    # the activity-only workers have no plugin: they get its heartbeat pacing here
    activity_options = {"max_heartbeat_throttle_interval": HEARTBEAT_THROTTLE, **options}
    workers = []
    if role in ("all", "workflows"):
        check_activities(workflows, [*plugin.activities, *activities])
        workers.append(
            Worker(
                client,
                task_queue=settings.task_queue,
                workflows=list(workflows),
                activities=list(activities),
                plugins=[plugin],
                **options,
            )
        )
    if settings.model_task_queue and role in ("all", "model"):
        workers.append(
            Worker(
                client,
                task_queue=settings.model_task_queue,
                activities=[plugin.model_activities.call_model],
                **activity_options,
            )
        )
    if settings.tool_task_queue and role in ("all", "tools"):
        tools = ToolActivities(plugin.registry.tools(), resources, plugin.registry.mcp)
        workers.append(
            Worker(
                client,
                task_queue=settings.tool_task_queue,
                activities=[tools.run_tool, plugin.registry.mcp.list_tools],
                **activity_options,
            )
        )
    return workers


def served_parts(settings: Settings, loops: Sequence[type], role: str) -> list[str]:
    """What the start line says besides agents and queues: the loops (workflow types) this
    process runs and the model endpoint its model calls go to, where it serves them."""
    parts = []
    if role in ("all", "workflows"):
        parts.append("loops " + ", ".join(workflow_name(w) for w in [*WORKFLOWS, *loops]))
    if role in ("all", "model") or (role == "workflows" and not settings.model_task_queue):
        parts.append("model " + ModelProvider.from_settings(settings).endpoint)
    return parts


async def connect_patiently(settings: Settings, patience: float = CONNECT_PATIENCE) -> Client:
    """Connect, trying again for `patience` seconds: a worker started while the server
    restarts (a deploy, an outage) waits for it rather than exiting."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    delay = 0.5
    while True:
        try:
            return await connect(settings)
        except RuntimeError as e:  # the SDK's "Failed client connect"
            if loop.time() + delay > give_up:
                raise
            log.warning("cannot reach Temporal at %s yet (%s); trying again", settings.address, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def run_worker(
    settings: Settings,
    *,
    agents: str | None = None,
    resources: str | None = None,
    workflows: str | None = None,
    activities: str | None = None,
    options: WorkerOptions | None = None,
    role: str = "all",
) -> None:
    """Connect, and serve the named agents (and loops) until SIGTERM or SIGINT, then shut
    down gracefully (see `WorkerOptions`); `role`: see `build_workers`."""
    ref = agents or settings.agents
    if not ref:
        raise SettingsError(
            "name the agents to serve: keel worker --agents mypkg.agents:AGENTS "
            "(or set KEEL_AGENTS); the demo's are keel.demo.agent:AGENTS"
        )
    served = load_agents(ref)
    loops = load_workflows(workflows or settings.workflows)
    own_activities = load_activities(activities or settings.activities)
    res = load_resources(resources or settings.resources)
    opts = options or WorkerOptions.from_env()
    client = await connect_patiently(settings, opts.connect_seconds)
    workers = build_workers(
        client,
        settings,
        agents=served,
        resources=res,
        workflows=loops,
        activities=own_activities,
        role=role,
        worker_options=opts.worker_options(),
    )
    names = [a.name for a in with_subagents(served)]
    queues = [w.task_queue for w in workers]
    health = HealthEndpoint({"task_queues": queues, "role": role, "agents": names})
    if opts.health_port is not None:
        port = await health.start(opts.health_host, opts.health_port)
        log.info("health endpoint on http://%s:%d/healthz", opts.health_host, port)
    log.info(
        "worker serving %s on task queue(s) %s at %s%s",
        ", ".join(names),
        ", ".join(queues),
        settings.address,
        "".join(f"; {part}" for part in served_parts(settings, loops, role)),
    )
    counts = None
    if settings.metrics_port:
        from keel.metrics import publish_run_counts

        counts = asyncio.create_task(publish_run_counts(client))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.gather(*(w.run() for w in workers))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not running.done():
            health.stopping = True
            log.info(
                "stopping: no new work; activities in flight get %.0f s to finish, then go "
                "back to Temporal to be retried elsewhere",
                opts.graceful_seconds,
            )
            await asyncio.gather(*(w.shutdown() for w in workers))
        await running
        await close_connections()  # the MCP servers' sessions (and their processes)
        log.info("worker stopped")
    finally:
        stopping.cancel()
        if counts is not None:
            counts.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await health.close()
