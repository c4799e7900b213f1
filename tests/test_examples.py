"""A team's own project on Keel (examples/helpdesk): its agents, tools and plan-and-execute
loop, served beside its own workflow, by Keel's worker and by the team's own."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from examples.helpdesk.agents import AGENTS, TicketDesk
from examples.helpdesk.workflows import PlanAndExecute, parse_plan
from keel.plugin import ModelProvider, build_worker
from keel.testing.model_server import RuleSet, ScriptedModelServer
from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel
from tests.wheel import Installed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "helpdesk"
RULES = EXAMPLE / "scripted_model.json"
REQUEST = "My laptop will not boot and the VPN is down"


@pytest.fixture
def helpdesk_model() -> AsyncIterator[ScriptedModelServer]:
    with ScriptedModelServer(RuleSet.load(RULES)) as server:
        yield server


@pytest.fixture
def helpdesk(harness: Harness, helpdesk_model: ScriptedModelServer) -> Harness:
    harness.model = helpdesk_model
    return harness


async def approve_child(h: Harness, run: str) -> dict:  # type: ignore[type-arg]
    """Wait for the sub-agent's approval request and grant it as the on-call lead."""

    async def waiting() -> object:
        return next((p for p in await h.agents.pending() if p.run_id.startswith(run)), None)

    p = await wait_for(waiting)
    await h.agents.approve(p.run_id, p.call_id, "lead")
    return {"run": p.run_id, "tool": p.tool, "arguments": p.arguments}


def test_a_plan_is_read_from_a_list() -> None:
    assert parse_plan("Sure:\n- look it up\n- open a ticket\n-\nthanks") == [
        "look it up",
        "open a ticket",
    ]


async def test_plan_and_execute_keeps_keels_guarantees(helpdesk: Harness, tmp_path: Path) -> None:
    desk = TicketDesk(tmp_path / "helpdesk.db")
    h = helpdesk
    worker = build_worker(
        h.client,
        settings=h.settings,
        agents=AGENTS,
        resources=desk,
        model=ModelProvider(model="scripted", base_url=h.model.url),
        workflows=[PlanAndExecute],
    )
    async with worker:
        run = await h.agents.start("planner", REQUEST, user="sam", loop=PlanAndExecute)
        approved = await approve_child(h, run)
        result = await h.agents.result(run, timeout=60)
        state = await h.agents.get_state(run)
        child = await h.agents.get_state(approved["run"])
    assert approved["tool"] == "open_ticket" and approved["arguments"]["priority"] == "urgent"
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == (
        "Done: the knowledge base covers the boot problem, and ticket T-0001 is open for the VPN."
    )
    assert state.loop_state["plan"] == [
        "search the knowledge base for boot problems",
        "ask triage to open an urgent ticket: VPN is down",
    ]
    # the planning and summary steps let no tool be called; the plan steps offered them all
    choices = [r["body"].get("tool_choice") for r in _planner(h)]
    assert choices[0] == "none" and choices[-1] == "none"
    assert set(choices[1:-1]) == {"auto"}
    # the delegation is the parent's effect, naming the child run that holds the ticket
    (effect,) = state.effects
    assert (effect.tool, effect.run_id) == ("ask_triage", approved["run"])
    assert child.agent == "triage" and child.status == AgentStatus.COMPLETED
    assert [e.tool for e in child.effects] == ["open_ticket"]
    assert desk.count() == 1


async def test_a_tool_not_offered_in_a_step_never_runs(harness: Harness, tmp_path: Path) -> None:
    """The planning step offers no tool: a model that calls one anyway is told so."""
    rules = json.loads(RULES.read_text())
    sneaky = {
        "name": "sneaky",
        "when": {"last_role": "user", "last_user": "^Make a plan", "any_user": "sneaky"},
        "reply": {"tool_calls": [{"name": "search_kb", "arguments": {"query": "vpn"}}]},
    }
    rules["rules"].insert(0, sneaky)
    desk = TicketDesk(tmp_path / "helpdesk.db")
    with ScriptedModelServer(RuleSet.from_dict(rules)) as model:
        harness.model = model
        worker = build_worker(
            harness.client,
            settings=harness.settings,
            agents=AGENTS,
            resources=desk,
            model=ModelProvider(model="scripted", base_url=model.url),
            workflows=[PlanAndExecute],
        )
        async with worker:
            run = await harness.agents.start("planner", "sneaky", loop=PlanAndExecute)
            result = await harness.agents.result(run, timeout=60)
            state = await harness.agents.get_state(run)
    refused = next(m for m in state.transcript if m.role == "tool")
    assert refused.content == (
        "Error: there is no tool named 'search_kb'. Available tools: none in this step."
    )
    assert result.status == AgentStatus.COMPLETED and state.loop_state["plan"] == []
    assert result.final_answer == "Done: nothing needed a ticket."


def _planner(h: Harness) -> list[dict]:  # type: ignore[type-arg]
    return [
        r
        for r in h.model.requests()
        if r["body"]["messages"][0]["content"].startswith("You help employees")
    ]


async def test_keel_worker_serves_a_projects_agents(helpdesk: Harness, tmp_path: Path) -> None:
    """`keel worker --agents examples.helpdesk.agents:AGENTS`, run from the project's root."""
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": helpdesk.client.service_client.config.target_host,
        "KEEL_TASK_QUEUE": helpdesk.settings.task_queue,
        "OPENAI_BASE_URL": helpdesk.model.url,
        "OPENAI_API_KEY": "scripted",
        "KEEL_MODEL": "scripted",
        "HELPDESK_DB": str(tmp_path / "helpdesk.db"),
    }
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "keel"),
        "worker",
        "--agents",
        "examples.helpdesk.agents:AGENTS",
        "--resources",
        "examples.helpdesk.agents:desk",
        "--workflows",
        "examples.helpdesk.workflows:PlanAndExecute",
        cwd=ROOT,
        env=env,
    )
    try:
        code, out, err = await keel(
            helpdesk, "start", "triage", "open a ticket: printer jammed", "--wait"
        )
        assert (code, out.strip()) == (0, "Opened ticket T-0001 (normal)."), err
        run = await helpdesk.agents.start("planner", REQUEST, loop=PlanAndExecute)
        await approve_child(helpdesk, run)
        result = await helpdesk.agents.result(run, timeout=60)
        assert result.status == AgentStatus.COMPLETED and "T-0002" in (result.final_answer or "")
    finally:
        proc.terminate()
        await proc.wait()
    assert TicketDesk(tmp_path / "helpdesk.db").count() == 2


async def test_the_wheel_serves_a_project_with_folders_named_like_keels(
    env: WorkflowEnvironment,
    helpdesk_model: ScriptedModelServer,
    installed_keel: Installed,
    tmp_path: Path,
) -> None:
    """Keel's wheel, installed in a fresh virtual environment (tests/wheel.py), beside a
    project that has its own workflows.py, activities.py, client.py and worker.py
    (examples/helpdesk, copied out of this repository): the project's worker serves its
    agents, its loop and its own workflow with KeelPlugin, and its client runs a
    conversation with an approval."""
    names = zipfile.ZipFile(installed_keel.wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"keel"}, top  # nothing of Keel's at the top level of site-packages
    assert "keel/demo/rules.json" in names

    python, site = installed_keel.python, installed_keel.site
    project = tmp_path / "helpdesk"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    where = subprocess.run(
        [python, "-c", "import keel, workflows; print(keel.__file__); print(workflows.__file__)"],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert where == [str(site / "keel" / "__init__.py"), str(project / "workflows.py")]

    run_env = {
        "PATH": os.environ["PATH"],
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "OPENAI_BASE_URL": helpdesk_model.url,
        "OPENAI_API_KEY": "scripted",
        "KEEL_MODEL": "scripted",
        "HELPDESK_DB": str(tmp_path / "helpdesk.db"),
    }
    async with _process(python, "worker.py", cwd=project, env=run_env, ready=b"ready"):
        client = await asyncio.create_subprocess_exec(
            python,
            "client.py",
            REQUEST,
            cwd=project,
            env=run_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(client.communicate(), 120)
    assert client.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["status"] == "completed"
    assert report["answer"].startswith("Done:") and "T-0001" in report["answer"]
    assert report["approved"][0]["tool"] == "open_ticket"
    assert len(report["plan"]) == 2
    assert report["tickets"] == 1  # the project's own workflow, on the same worker


@asynccontextmanager
async def _process(
    *cmd: object, cwd: Path, env: dict[str, str], ready: bytes
) -> AsyncIterator[None]:
    """A process that prints `ready` once it serves; stopped on the way out."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd), cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert ready in line, line
        yield
    finally:
        proc.terminate()
        await proc.wait()
