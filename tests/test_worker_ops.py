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
from keel.serve import WorkerOptions
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
    with pytest.raises(SettingsError, match="KEEL_WORKER_HEALTH_PORT must be a number"):
        WorkerOptions.from_env({"KEEL_WORKER_HEALTH_PORT": "eighty"})
