"""Recorded histories replay against today's workflow code: determinism is kept.

The replayer is configured by KeelPlugin, as a team's own replay tests would be."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from keel.config import Settings
from keel.plugin import KeelPlugin

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(f"history-{path.stem}", path.read_text())
    replayer = Replayer(workflows=[], plugins=[KeelPlugin(settings=Settings())])
    await replayer.replay_workflow(history)


def test_histories_are_there() -> None:
    assert len(HISTORIES) >= 7
