"""Recorded histories replay against today's workflow code: determinism is kept.

The replayer is configured by KeelPlugin, as a team's own replay tests would be. A file
`NAME.json` ran as the workflow `history-NAME` (`NAME.anything.json` too: an older recording
kept beside a newer one)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from examples.helpdesk.workflows import PlanAndExecute
from keel.config import Settings
from keel.plugin import KeelPlugin
from keel.workflows.agent import AgentWorkflow
from keel.workflows.models import WORKFLOW_TYPE, AgentInput, AgentResult, AgentSpec

HERE = Path(__file__).parent / "histories"
HISTORIES = sorted(HERE.glob("*.json"))
# `stored` keeps its payloads outside the history, in this directory
SETTINGS = Settings(payload_dir=str(HERE / "payloads"))


def history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"history-{path.name.split('.')[0]}", path.read_text())


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    replayer = Replayer(workflows=[PlanAndExecute], plugins=[KeelPlugin(settings=SETTINGS)])
    await replayer.replay_workflow(history(path))


def test_histories_are_there() -> None:
    names = {p.name.split(".")[0] for p in HISTORIES}
    assert {
        "approve",
        "edit",
        "reject",
        "cancel",
        "continue-as-new",
        "stored",
        "stored-ref",
        "plan",
        "parked",
        "expiry",
        "streamed",
    } <= names


@workflow.defn(name=WORKFLOW_TYPE)
class ChangedLoop(AgentWorkflow):
    """The default loop with one command more (a timer before its first model step), as a
    careless change would make it."""

    @workflow.run
    async def run(self, input: AgentInput) -> AgentResult:
        return await self.execute(input, self._changed)

    async def _changed(self, spec: AgentSpec) -> AgentResult:
        await workflow.sleep(timedelta(seconds=1))
        return await self._loop(spec)


@pytest.mark.timeout(60)
async def test_replay_catches_a_change_to_the_commands() -> None:
    """The replay test can fail: a loop that issues other commands is refused."""
    replayer = Replayer(
        workflows=[ChangedLoop],
        data_converter=SETTINGS.data_converter(),
        workflow_runner=UnsandboxedWorkflowRunner(),  # it lives in this test module
    )
    result = await replayer.replay_workflow(
        history(HERE / "approve.json"), raise_on_replay_failure=False
    )
    assert "Nondeterminism" in str(result.replay_failure)
