"""MCP servers as toolsets, against the reference servers from PyPI (over stdio) and npm (the
filesystem server, via npx where Node is present): their tools pinned in the run's spec,
called through Keel's tool step, governed like any tool."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from keel.activities.mcp import MCPStdio
from keel.activities.registry import Agent, AgentDefinitionError
from keel.config import SettingsError
from keel.testing import AgentEnvironment
from keel.workflows.models import AgentStatus, ApprovalMode, ApprovalPolicy, Policy, PolicyAgent
from tests.conftest import wait_for
from tests.mcp_servers.agents import CLOCK, MCP_RULES, TIME, db_agent
from tests.test_cli import keel


async def test_a_reference_server_over_stdio(env: WorkflowEnvironment) -> None:
    async with AgentEnvironment(env.client, [CLOCK], MCP_RULES) as e:
        run = await e.start("timekeeper", "what time is it?")
        result = await e.agents.result(run, timeout=120)
        state = await e.agents.get_state(run)
        _, status, _ = await keel(e, "status", run)  # type: ignore[arg-type]
    assert result.status == AgentStatus.COMPLETED
    assert '"timezone": "UTC"' in (result.final_answer or "")
    # keel status names the tool list the run pinned
    assert f"MCP server time: tools {state.spec.mcp[0].digest[:19]}" in status  # type: ignore[union-attr]
    spec = state.spec
    assert spec is not None
    (pin,) = spec.mcp
    assert pin.server == "time" and pin.digest.startswith("sha256:")
    assert pin.tools == ["time_convert_time", "time_get_current_time"]
    tool = spec.tool("time_get_current_time")
    assert tool is not None and not tool.side_effects  # its readOnlyHint, trusted
    assert tool.parameters["required"] == ["timezone"]  # the server's schema, pinned
    assert tool.mcp_server == "time" and tool.mcp_tool == "get_current_time"
    assert state.effects == []


async def test_a_write_waits_for_approval_and_runs_once(
    env: WorkflowEnvironment, tmp_path: Path
) -> None:
    agent = db_agent(tmp_path / "records.db")
    async with AgentEnvironment(env.client, [agent], MCP_RULES) as e:
        made = await e.run("db", "make a table", timeout=120)
        assert made.status == AgentStatus.COMPLETED  # create_table: a side effect, no approval
        run = await e.start("db", "insert 7")
        state = await wait_for(lambda: _pending(e, run))
        (request,) = state.pending_approvals
        assert request.tool == "db_write_query"
        await e.agents.approve(run, request.call_id, "alice")
        inserted = await e.agents.result(run, timeout=120)
        record = await e.agents.get_state(run)
        read = await e.run("db", "read the table", timeout=120)
    assert inserted.status == AgentStatus.COMPLETED
    (effect,) = record.effects
    assert effect.tool == "db_write_query" and effect.idempotency_key
    assert "[{'x': 7}]" in (read.final_answer or "")


async def _pending(e: AgentEnvironment, run: str) -> object:
    s = await e.agents.get_state(run)
    return s if s.pending_approvals else None


def test_approvals_may_name_a_server_tool_known_once_listed() -> None:
    """A name the server may list is checked when it is listed; any other is refused now."""
    Agent(
        name="ok",
        instructions="",
        toolsets=[TIME],
        approvals={"time_convert_time": ApprovalPolicy(mode=ApprovalMode.ALWAYS)},
    )
    with pytest.raises(AgentDefinitionError, match="convert_time"):
        Agent(
            name="bad",
            instructions="",
            toolsets=[TIME],
            approvals={"convert_time": ApprovalPolicy(mode=ApprovalMode.ALWAYS)},
        )


async def test_a_misspelt_approval_fails_the_run_clearly(env: WorkflowEnvironment) -> None:
    """Unknown until listed: then the run fails, naming it, before any tool runs."""
    server = MCPStdio(
        "time",
        TIME.command,
        list(TIME.args),
        approvals={"get_curent_time": ApprovalPolicy(mode=ApprovalMode.ALWAYS)},
    )
    agent = Agent(name="clock2", instructions="", toolsets=[server])
    async with AgentEnvironment(env.client, [agent], MCP_RULES) as e:
        result = await e.run("clock2", "what time is it?", timeout=120)
    assert result.status == AgentStatus.FAILED
    assert "get_curent_time" in (result.error or "") and "get_current_time" in (result.error or "")


async def test_the_policy_narrows_a_servers_tools(env: WorkflowEnvironment) -> None:
    policy = Policy(agents={"timekeeper": PolicyAgent(tools=["time_convert_time"])})
    async with AgentEnvironment(env.client, [CLOCK], MCP_RULES, policy=policy) as e:
        run = await e.start("timekeeper", "what time is it?")
        result = await e.agents.result(run, timeout=120)
        state = await e.agents.get_state(run)
    assert state.spec is not None
    assert [t.name for t in state.spec.tools] == ["time_convert_time"]
    assert "not allowed" in (result.final_answer or "")


def test_a_policy_naming_a_tool_no_server_may_have_is_refused_at_start() -> None:
    from keel.plugin import KeelPlugin

    policy = Policy(agents={"timekeeper": PolicyAgent(tools=["clock_get_current_time"])})
    with pytest.raises(SettingsError, match="clock_get_current_time"):
        KeelPlugin([CLOCK], policy=policy)


@pytest.mark.skipif(shutil.which("npx") is None, reason="needs Node's npx (and the npm registry)")
async def test_the_filesystem_server_from_npm(env: WorkflowEnvironment, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("the keel holds")
    server = MCPStdio(
        "fs",
        "npx",
        ["-y", "@modelcontextprotocol/server-filesystem", str(tmp_path)],
        trust_read_only_hint=True,
        timeout_seconds=120,
    )
    agent = Agent(name="files", instructions="Read files.", toolsets=[server])
    rules = {
        "rules": [
            {
                "name": "read",
                "when": {"last_role": "user", "last_user": "(?i)read the notes"},
                "reply": {
                    "tool_calls": [
                        {
                            "name": "fs_read_text_file",
                            "arguments": {"path": str(tmp_path / "notes.txt")},
                        }
                    ]
                },
            },
            *MCP_RULES["rules"],
        ]
    }
    async with AgentEnvironment(env.client, [agent], rules) as e:
        run = await e.start("files", "read the notes")
        result = await e.agents.result(run, timeout=300)
        state = await e.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert "the keel holds" in (result.final_answer or "")
    assert state.spec is not None and not state.spec.tool("fs_read_text_file").side_effects
    assert state.spec.tool("fs_write_file").side_effects


async def test_a_recorded_run_replays_with_the_server_gone() -> None:
    """`python -m tests.record_histories --only mcp`: the listing and the call are in the
    history; replay asks no server (none is declared here at all)."""
    from temporalio.client import WorkflowHistory
    from temporalio.worker import Replayer

    from keel.config import Settings
    from keel.plugin import KeelPlugin

    path = Path(__file__).parent / "histories" / "mcp.json"
    history = WorkflowHistory.from_json("history-mcp", path.read_text())
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled == [
        "keel.mcp_list_tools",
        "keel.call_model",
        "keel.run_tool",
        "keel.call_model",
    ]
    replayer = Replayer(workflows=[], plugins=[KeelPlugin(settings=Settings())])
    await replayer.replay_workflow(history)


async def test_a_tools_worker_lists_and_calls_the_servers(env: WorkflowEnvironment) -> None:
    """With KEEL_TOOL_TASK_QUEUE, the listing and the calls go to the tools' workers."""
    import dataclasses

    from keel.worker import build_workers

    e = AgentEnvironment(env.client, [CLOCK], MCP_RULES)  # its model, not its worker
    q = e.settings.task_queue
    with e.model:
        settings = dataclasses.replace(
            e.settings, tool_task_queue=f"{q}-tools", model_port=e.model.port
        )
        (runs,) = build_workers(e.client, settings, agents=[CLOCK], role="workflows")
        (tools,) = build_workers(e.client, settings, agents=[CLOCK], role="tools")
        async with runs, tools:
            run = await e.start("timekeeper", "what time is it?")
            result = await e.agents.result(run, timeout=120)
            history = await e.client.get_workflow_handle(run).fetch_history()
    assert result.status == AgentStatus.COMPLETED
    queues = [
        (a.activity_type.name, a.task_queue.name)
        for ev in history.events
        if ev.HasField("activity_task_scheduled_event_attributes")
        for a in [ev.activity_task_scheduled_event_attributes]
    ]
    assert queues == [
        ("keel.mcp_list_tools", f"{q}-tools"),
        ("keel.call_model", q),
        ("keel.run_tool", f"{q}-tools"),
        ("keel.call_model", q),
    ]
