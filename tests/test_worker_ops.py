"""Operating workers: `keel worker` shuts down gracefully on SIGTERM, with a health endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from keel.config import SettingsError
from keel.worker import WorkerOptions
from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel as keel_cli

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def _keel_worker(h: Harness, health_port: int, **extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": h.env.client.service_client.config.target_host,
        "KEEL_TASK_QUEUE": h.settings.task_queue,
        "KEEL_MODEL_PORT": str(h.model.port),
        "KEEL_AGENTS": "tests.agents:TEST_AGENTS",
        "KEEL_RESOURCES": "tests.agents:ledger_from_env",
        "KEEL_TEST_LEDGER": str(h.ledger.path),
        "KEEL_WORKER_HEALTH_PORT": str(health_port),
        "KEEL_WORKER_GRACEFUL_SECONDS": "120",
        **extra,
    }
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "KEEL_MODEL"):
        env.pop(name, None)
    keel = Path(sys.executable).parent / "keel"
    # its whole output, as a log file gets it (Temporal's own lines may go to either stream)
    return subprocess.Popen(
        [str(keel), "worker"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _attempts(h: Harness) -> list[str]:
    return [r["body"] for r in h.ledger.rows("outbox") if r["to_addr"] == "held@example.com"]


async def test_sigterm_lets_a_busy_worker_finish_its_tool(harness: Harness) -> None:
    port = _free_port()
    proc = _keel_worker(harness, port)
    try:
        status, body = await wait_for(lambda: _health(port)[0] == 200 and _health(port))
        assert body["status"] == "serving" and "holder" in body["agents"]
        run = await harness.start("holder", "hold the tool")
        await wait_for(lambda: _attempts(harness) == ["attempt 1"])
        proc.send_signal(signal.SIGTERM)
        # stopping: it says so, takes no new work, and waits for the tool in flight
        status, body = await wait_for(lambda: _health(port)[0] == 503 and _health(port))
        assert body["status"] == "stopping"
        assert proc.poll() is None
        (harness.ledger.path.parent / "gate").touch()  # the tool may finish now
        code = await asyncio.to_thread(proc.wait, 60)
        log = proc.stdout.read().decode() if proc.stdout else ""
        assert code == 0, log
        assert "stopping: no new work" in log and "worker stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the tool's first attempt finished and counted: a new worker goes on from there
    async with harness.running():
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert _attempts(harness) == ["attempt 1"]
    tool = next(m for m in state.transcript if m.role == "tool")
    assert json.loads(tool.content) == {"attempt": 1}


def test_worker_options_from_the_environment() -> None:
    opts = WorkerOptions.from_env(
        {
            "KEEL_WORKER_GRACEFUL_SECONDS": "5",
            "KEEL_WORKER_MAX_ACTIVITIES": "8",
            "KEEL_WORKER_MAX_WORKFLOW_TASKS": "1",
        }
    )
    options = opts.worker_options()
    assert options["graceful_shutdown_timeout"].total_seconds() == 5
    assert options["max_concurrent_activities"] == 8
    assert options["max_concurrent_workflow_tasks"] == 2  # Temporal's least
    assert WorkerOptions.from_env({}).worker_options().keys() == {"graceful_shutdown_timeout"}
    with pytest.raises(
        SettingsError, match="KEEL_WORKER_HEALTH_PORT='eighty' is not a whole number"
    ):
        WorkerOptions.from_env({"KEEL_WORKER_HEALTH_PORT": "eighty"})


def test_settings_never_print_a_secret() -> None:
    from keel.config import Settings

    secrets = {
        "OPENAI_API_KEY": "sk-do-not-print",
        "TEMPORAL_API_KEY": "tmprl-do-not-print",
        "KEEL_CODEC_AUTH_TOKEN": "codec-token-do-not-print",
    }
    shown = repr(Settings.from_env(secrets))
    assert not any(v in shown for v in secrets.values()), shown


async def test_model_calls_are_paced_per_worker() -> None:
    # KEEL_MODEL_CALLS_PER_SECOND=2: five calls at the same moment start 0.5 s apart
    from keel.activities.model import Pace
    from keel.config import Settings

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))

    pace = Pace(2.0, clock=lambda: 100.0, sleep=sleep)
    for _ in range(5):
        await pace.wait()
    assert slept == [0.5, 1.0, 1.5, 2.0]
    await Pace(0, clock=lambda: 100.0, sleep=sleep).wait()  # no limit: no wait
    assert slept == [0.5, 1.0, 1.5, 2.0]
    assert Settings.from_env({"KEEL_MODEL_CALLS_PER_SECOND": "2.5"}).model_calls_per_second == 2.5
    with pytest.raises(SettingsError, match="KEEL_MODEL_CALLS_PER_SECOND"):
        Settings.from_env({"KEEL_MODEL_CALLS_PER_SECOND": "x"})


async def test_model_and_tool_calls_on_queues_of_their_own(harness: Harness) -> None:
    import dataclasses

    from temporalio.api.enums.v1 import EventType

    from keel.worker import build_workers
    from tests.agents import TEST_AGENTS

    q = harness.settings.task_queue
    settings = dataclasses.replace(
        harness.settings,
        model_task_queue=f"{q}-model",
        tool_task_queue=f"{q}-tools",
        model_port=harness.model.port,
    )

    def workers(role: str) -> list:  # type: ignore[type-arg]
        return build_workers(
            harness.client, settings, agents=TEST_AGENTS, resources=harness.ledger, role=role
        )

    (runs,) = workers("workflows")
    (models,) = workers("model")
    async with runs, models:
        run = await harness.start("calc", "add 2 and 3")
        # the tool's queue has no worker yet: the call waits there, the run is unharmed
        await wait_for(lambda: _tool_waiting(harness, run))
        (tools,) = workers("tools")
        async with tools:
            result = await harness.agents.result(run, timeout=30)
        history = await harness.client.get_workflow_handle(run).fetch_history()
    assert result.status == AgentStatus.COMPLETED and "5" in (result.final_answer or "")
    queues = [
        (a.activity_type.name, a.task_queue.name)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        for a in [e.activity_task_scheduled_event_attributes]
    ]
    assert queues == [
        ("keel.call_model", f"{q}-model"),
        ("keel.run_tool", f"{q}-tools"),
        ("keel.call_model", f"{q}-model"),
    ]
    with pytest.raises(SettingsError, match="KEEL_TOOL_TASK_QUEUE"):
        build_workers(harness.client, harness.settings, agents=TEST_AGENTS, role="tools")


async def _tool_waiting(h: Harness, run: str) -> bool:
    events = [e async for _, e in h.agents.events(run, follow=False)]
    return any(e.kind.value == "tool_started" for e in events)


async def test_the_worker_log_reads_plainly(harness: Harness) -> None:
    """What an operator reads in a worker's log (a file, not a terminal): a start line that
    names the loops and the model endpoint; Temporal's own lines with no escape codes; and
    no "Query not found" after ordinary reads (a read that left before its answer)."""
    port = _free_port()
    proc = _keel_worker(harness, port, KEEL_WORKFLOWS="examples.helpdesk.workflows:PlanAndExecute")
    try:
        await wait_for(lambda: _health(port)[0] == 200)
        run = await harness.start("calc", "add 2 and 3")
        failed = await harness.start("nope", "hi")  # ends at once: its first task fails
        await harness.agents.result(run, timeout=60)
        for _ in range(4):
            code, out, err = await keel_cli(harness, "result", run)
            assert (code, out.strip()) == (0, "The sum is 5."), err
        code, _, err = await keel_cli(harness, "result", failed)
        assert code == 1 and "unknown agent 'nope'" in err
        # a loop this worker does not serve: its workflow task fails, and Temporal says so
        stray = await harness.agents.start("calc", "hi", loop="NoSuchLoop")
        await wait_for(lambda: _task_failed(harness, stray))
        await harness.client.get_workflow_handle(stray).terminate()
        await harness.agents.get_state(run)  # the worker has answered what came before
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    log = proc.stdout.read().decode() if proc.stdout else ""
    start = next(line for line in log.splitlines() if "worker serving" in line)
    assert "; loops keel.AgentWorkflow, helpdesk.PlanAndExecute" in start, start
    assert f"; model scripted at http://127.0.0.1:{harness.model.port}/v1" in start, start
    assert "Failing workflow task" in log  # Temporal's own line, written through logging
    assert "\x1b[" not in log
    assert "Query not found" not in log


async def _task_failed(h: Harness, run: str) -> bool:
    from temporalio.api.enums.v1 import EventType

    history = await h.client.get_workflow_handle(run).fetch_history()
    return any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED for e in history.events)


async def test_an_unreachable_model_is_named_by_its_address(harness: Harness) -> None:
    from keel.activities.registry import Agent
    from keel.workflows.models import ModelSettings

    port = _free_port()  # nothing listens there
    far = Agent(
        name="far",
        instructions="Answer.",
        model=ModelSettings(
            base_url=f"http://someone:secret@127.0.0.1:{port}/v1?key=sk-secret", max_attempts=1
        ),
    )
    async with harness.running([far]):
        run = await harness.start("far", "say hello")
        state = await wait_for(lambda: _waiting_provider(harness, run))
        await harness.agents.cancel(run)
    assert f"provider unreachable at http://127.0.0.1:{port}/v1:" in state.provider_error
    assert "secret" not in state.provider_error


async def _waiting_provider(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.status == AgentStatus.WAITING_PROVIDER else None


async def test_a_workflow_of_your_own_is_served_with_its_activities(harness: Harness) -> None:
    from keel.worker import build_workers, load_activities, load_workflows
    from tests.agents import TEST_AGENTS
    from tests.plain_workflows import Shout

    loops = load_workflows("tests.plain_workflows:Shout")

    def workers(activities: list) -> list:  # type: ignore[type-arg]
        return build_workers(
            harness.client,
            harness.settings,
            agents=TEST_AGENTS,
            workflows=loops,
            activities=activities,
        )

    # without its activities the worker would take the workflow and retry them forever
    with pytest.raises(SettingsError) as refused:
        workers([])
    assert str(refused.value).startswith(
        "workflow tests.Shout calls activity 'tests.count_words', "
        "'tests.shout' (tests.plain_workflows:shout), which this worker does not serve: "
        "name it with --activities module:attribute"
    )
    with pytest.raises(SettingsError, match="calls activity 'tests.count_words', which"):
        workers(load_activities("tests.plain_workflows:shout"))
    with pytest.raises(SettingsError, match="is not an @activity.defn function"):
        load_activities("tests.plain_workflows:CALL_TIMEOUT")
    (worker,) = workers(load_activities("tests.plain_workflows:ACTIVITIES"))
    async with worker:
        said = await harness.client.execute_workflow(
            Shout.run,
            "hello there",
            id=f"shout-{harness.settings.task_queue}",
            task_queue=harness.settings.task_queue,
            execution_timeout=timedelta(minutes=1),
        )
    assert said == "HELLO THERE (2 words)"
    # `keel worker` says the same, before it serves anything
    code, _, err = await keel_cli(
        harness,
        "worker",
        "--agents",
        "tests.agents:TEST_AGENTS",
        "--workflows",
        "tests.plain_workflows:Shout",
        "--activities",
        "tests.plain_workflows:shout",
    )
    assert code == 1 and "Traceback" not in err
    assert "keel: workflow tests.Shout calls activity 'tests.count_words'" in err
