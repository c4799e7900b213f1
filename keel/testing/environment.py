"""Agents under test: a Temporal dev server, and a Keel worker against the scripted model."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from keel.activities.registry import Agent
from keel.client.api import AgentClient
from keel.config import Settings
from keel.plugin import ModelProvider, build_worker
from keel.testing.model_server import MODEL_ID, RuleSet, ScriptedModelServer
from keel.workflows.models import SEARCH_ATTRIBUTES, AgentResult

# A test's run that is never answered ends on its own rather than outlive the test.
RUN_TIMEOUT = timedelta(minutes=5)


async def start_local_temporal(
    *, extra_args: Sequence[str] = (), **options: Any
) -> WorkflowEnvironment:
    """Temporal's dev server for tests, in memory: the `temporal` binary Keel installs (no
    download), Keel's search attributes and data converter. `async with await
    start_local_temporal() as temporal:`; `options` go to `WorkflowEnvironment.start_local`."""
    from keel.dev import dev_server_args, temporal_binary

    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_extra_args=[*dev_server_args(file_backed=False), *extra_args],
        **options,
    )


class AgentEnvironment:
    """Agents served by a Keel worker on a task queue of their own, against the scripted model.

        async with AgentEnvironment(temporal.client, AGENTS, "tests/rules.json") as env:
            result = await env.run("triage", "open a ticket: printer jammed")

    `rules`: a rules file's path, a dict in its shape, a RuleSet, or a ScriptedModelServer
    already serving (then the environment neither starts nor stops it). `resources` is what
    tools get as `ctx.resources`; `worker_options` go to the Worker. Inside, `agents` is an
    AgentClient on the environment's task queue (approve, send_message, get_state, ...) and
    `model` the scripted model (its request log, `release` for held replies, faults)."""

    def __init__(
        self,
        client: Client,
        agents: Sequence[Agent],
        rules: RuleSet | Mapping[str, Any] | str | Path | ScriptedModelServer | None = None,
        *,
        resources: Any = None,
        settings: Settings | None = None,
        **worker_options: Any,
    ) -> None:
        self.settings = settings or Settings(task_queue=f"keel-test-{uuid.uuid4().hex[:8]}")
        self.client = _with_keel_converter(client, self.settings)
        self.agents = AgentClient(self.client, self.settings)
        self._owns_model = not isinstance(rules, ScriptedModelServer)
        self.model = rules if isinstance(rules, ScriptedModelServer) else ScriptedModelServer(rules)
        self._served = list(agents)
        self._resources = resources
        self._worker_options = worker_options
        self._worker: Worker | None = None

    @property
    def provider(self) -> ModelProvider:
        """The scripted model as the workers' model provider."""
        return ModelProvider(model=MODEL_ID, base_url=self.model.base_url)

    def worker(self, agents: Sequence[Agent] | None = None, **options: Any) -> Worker:
        """One more worker on this environment's task queue (not running: `async with` it),
        serving `agents` (default: the environment's)."""
        return build_worker(
            self.client,
            settings=self.settings,
            agents=self._served if agents is None else agents,
            resources=self._resources,
            model=self.provider,
            **{**self._worker_options, **options},
        )

    async def start(
        self,
        agent: str,
        message: str,
        *,
        user: str = "tester",
        execution_timeout: timedelta = RUN_TIMEOUT,
        **options: Any,
    ) -> str:
        """Start a run of `agent` on `message`; returns its id (`options`: AgentClient.start's)."""
        return await self.agents.start(
            agent,
            message,
            user=user,
            run_id=f"test-{agent}-{uuid.uuid4().hex[:10]}",
            execution_timeout=execution_timeout,
            **options,
        )

    async def run(
        self, agent: str, message: str, *, user: str = "tester", timeout: float = 60.0
    ) -> AgentResult:
        """Start a run and wait for its answer: it ended, or went idle after a turn."""
        return await self.agents.result(await self.start(agent, message, user=user), timeout)

    async def __aenter__(self) -> AgentEnvironment:
        if self._owns_model:
            self.model.start()
        try:
            worker = self.worker()
            await worker.__aenter__()
        except BaseException:
            if self._owns_model:
                self.model.stop()
            raise
        self._worker = worker
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        worker, self._worker = self._worker, None
        try:
            if worker is not None:
                await worker.__aexit__(exc_type, exc, tb)
        finally:
            if self._owns_model:
                self.model.stop()


def _with_keel_converter(client: Client, settings: Settings) -> Client:
    """The client itself if it carries Keel's payloads, else one on the same connection that
    does (a plain `WorkflowEnvironment.start_local()` client, say)."""
    if client.data_converter.payload_converter_class is PydanticPayloadConverter:
        return client
    config = client.config()
    config["data_converter"] = settings.data_converter(client.data_converter)
    return Client(**config)
