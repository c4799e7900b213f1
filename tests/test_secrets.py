"""Secrets for tools come from the worker's environment by reference, never through payloads."""

from __future__ import annotations

import base64
import json
import os

import pytest
from pydantic import BaseModel

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.workflows.models import AgentStatus
from tests.agents import INSTRUCTIONS
from tests.conftest import Harness

KEY = "KEEL_TEST_CRM_KEY"
VALUE = "crm-s3cr3t-value-7f2a"


class NoArgs(BaseModel):
    pass


@tool(secrets=[KEY], max_attempts=1)
async def crm(args: NoArgs, ctx: ToolContext) -> str:
    """Look a customer up in the CRM (with the worker's API key)."""
    key = ctx.secret(KEY)
    return json.dumps({"customer": "Dana", "debug": f"called with {key}"})  # a careless tool


@tool(max_attempts=1)
async def snoop(args: NoArgs, ctx: ToolContext) -> str:
    """Try to read a secret it did not declare."""
    return ctx.secret(KEY)


SECRETIVE = Agent(name="secretive", instructions=INSTRUCTIONS, tools=[crm, snoop])


@pytest.fixture
def secret_in_env() -> object:
    os.environ[KEY] = VALUE
    yield
    os.environ.pop(KEY, None)


async def test_a_secret_never_enters_the_history(harness: Harness, secret_in_env: object) -> None:
    async with harness.running([SECRETIVE]):
        run = await harness.start("secretive", "use the crm")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
        other = await harness.start("secretive", "snoop")
        await harness.agents.result(other, timeout=30)
        refused = await harness.agents.get_state(other)
        raw = (await harness.client.get_workflow_handle(run).fetch_history()).to_json()
        raw_other = (await harness.client.get_workflow_handle(other).fetch_history()).to_json()
    assert result.status == AgentStatus.COMPLETED
    tool_result = next(m for m in state.transcript if m.role == "tool").content or ""
    assert f"[secret {KEY}]" in tool_result and VALUE not in tool_result
    assert VALUE not in _decoded(raw) and VALUE not in _decoded(raw_other)
    assert "called with" in _decoded(raw)  # (the check reads the payloads themselves)
    assert KEY in json.dumps(state.spec.model_dump() if state.spec else {})  # the name only
    snooped = next(m for m in refused.transcript if m.role == "tool").content or ""
    assert "may read only the secrets it declares (none), not 'KEEL_TEST_CRM_KEY'" in snooped


def _decoded(history_json: str) -> str:
    """Every payload of a history, decoded (the JSON holds them base64-encoded)."""
    out: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            data = x.get("data")
            if isinstance(data, str) and "metadata" in x:
                out.append(base64.b64decode(data).decode("utf-8", "replace"))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(history_json))
    return "\n".join(out)
