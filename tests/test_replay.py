"""Recorded histories replay against today's workflow code: determinism is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from keel.workflows.agent import AgentWorkflow
from keel.workflows.errors import WORKFLOW_FAILURE_TYPES
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(
        workflows=[AgentWorkflow],
        data_converter=pydantic_data_converter,
        workflow_failure_exception_types=WORKFLOW_FAILURE_TYPES,
    )
    await replayer.replay_workflow(history)


def test_histories_are_there() -> None:
    assert len(HISTORIES) >= 5
