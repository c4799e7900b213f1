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
from pathlib import Path

import pytest

from keel.config import SettingsError
from keel.worker import WorkerOptions
from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for

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


def _keel_worker(h: Harness, health_port: int) -> subprocess.Popen[bytes]:
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
    }
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "KEEL_MODEL"):
        env.pop(name, None)
    keel = Path(sys.executable).parent / "keel"
    return subprocess.Popen([str(keel), "worker"], cwd=ROOT, env=env, stderr=subprocess.PIPE)


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
        log = proc.stderr.read().decode() if proc.stderr else ""
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
