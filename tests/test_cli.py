"""The `keel` command line against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for

KEEL = str(Path(sys.executable).parent / "keel")


async def keel(
    h: Harness | None, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    e = dict(os.environ)
    e.pop("OPENAI_API_KEY", None)
    e.pop("OPENAI_BASE_URL", None)
    if h is not None:
        e["TEMPORAL_ADDRESS"] = h.client.service_client.config.target_host
        e["KEEL_TASK_QUEUE"] = h.settings.task_queue
    e.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        KEEL, *args, env=e, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_start_wait_status_list(harness: Harness) -> None:
    async with harness.running():
        code, out, err = await keel(
            harness,
            "start",
            "calc",
            "add 2 and 3",
            "--id",
            "cli-sum-" + harness.settings.task_queue,
            "--wait",
        )
        assert (code, out.strip()) == (0, "The sum is 5."), err
        run = "cli-sum-" + harness.settings.task_queue
        code, out, _ = await keel(harness, "status", run, "--json")
        state = json.loads(out)
        assert state["status"] == "completed" and state["final_answer"] == "The sum is 5."
        assert {"step", "pending_approvals", "usage", "effects", "audit"} <= set(state)
        code, out, _ = await keel(harness, "result", run)
        assert out.strip() == "The sum is 5."
        listed = await wait_for(lambda: _listed(harness, run))
        assert listed["status"] == "completed" and listed["agent"] == "calc"


async def _listed(h: Harness, run: str) -> dict | None:  # type: ignore[type-arg]
    code, out, _ = await keel(h, "list", "--json", "--status", "completed")
    return next((r for r in json.loads(out) if r["run_id"] == run), None)


async def test_pending_approve_say_cancel(harness: Harness) -> None:
    async with harness.running():
        code, run, _ = await keel(harness, "start", "shop-open", "charge 30", "--user", "dana")
        run = run.strip()
        pending = await wait_for(lambda: _pending(harness, run))
        call_id = pending["call_id"]
        assert pending["tool"] == "charge" and pending["arguments"]["amount"] == 30
        code, _, err = await keel(harness, "approve", run, call_id, "--as", "mallory")
        assert code == 1 and "'mallory' may not decide" in err and "Traceback" not in err
        code, _, err = await keel(
            harness, "approve", run, call_id, "--as", "alice", "--edit", "{bad"
        )
        assert code == 1 and "--edit is not valid JSON" in err
        code, out, _ = await keel(harness, "approve", run, call_id, "--as", "alice")
        assert code == 0 and f"approved {call_id} as alice" in out
        await wait_for(lambda: _status(harness, run, "idle"))
        code, out, _ = await keel(harness, "say", run, "say hello", "--policy", "queue")
        assert code == 0 and out.startswith("delivered")
        await wait_for(lambda: _status(harness, run, "idle", "Hello!"))
        code, out, _ = await keel(harness, "cancel", run)
        assert code == 0
        await wait_for(lambda: _status(harness, run, "cancelled"))


async def _pending(h: Harness, run: str) -> dict | None:  # type: ignore[type-arg]
    _, out, _ = await keel(h, "pending", "--json")
    return next((p for p in json.loads(out) if p["run_id"] == run), None)


async def _status(h: Harness, run: str, status: str, answer: str | None = None) -> bool:
    s = await h.agents.get_state(run)
    return s.status.value == status and (answer is None or s.final_answer == answer)


async def test_dev_reports_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out, err = await keel(
            None,
            "dev",
            env={"TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "KEEL_HOME": str(tmp_path)},
        )
    assert code == 1
    assert f"port {port}" in err and "is taken" in err and "Traceback" not in err


async def test_every_door_answers_clearly_when_no_worker_serves_the_run(
    harness: Harness,
) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        call_id = (await wait_for(lambda: _pending(harness, run)))["call_id"]
        done = await harness.start("calc", "say hello")
        await harness.agents.result(done, timeout=30)
    # no worker now: approve says what happens instead of hanging
    code, out, err = await keel(harness, "approve", run, call_id, "--as", "alice")
    assert code == 0, err
    assert "no worker is serving this run" in out and "applies when a worker" in out
    # so does a message: kept, delivered once a worker serves the run
    code, out, err = await keel(harness, "say", run, "hello there")
    assert code == 0 and out.startswith("queued") and "no worker" in out, err
    # pending lists the run as unreachable rather than leaving it out
    code, out, _ = await keel(harness, "pending", "--json")
    listed = next(p for p in json.loads(out) if p["run_id"] == run)
    assert listed["reachable"] is False and "cannot be read now" in listed["reason"]
    # status of a finished run: what Temporal knows, with no worker
    code, out, err = await keel(harness, "status", done)
    assert code == 0 and "completed" in out and "Traceback" not in err
    async with harness.running():  # a worker comes back: the decision applies
        result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "You said: hello there"
    assert [r["amount"] for r in harness.ledger.rows("refunds")] == [30]


async def test_bad_arguments_get_one_line_not_a_traceback(harness: Harness) -> None:
    code, _, err = await keel(harness, "list", "--status", "bogus")
    assert code == 2 and "invalid choice: 'bogus'" in err and "Traceback" not in err
    code, _, err = await keel(
        None, "list", env={"TEMPORAL_ADDRESS": "127.0.0.1:1", "KEEL_TASK_QUEUE": "x"}
    )
    assert code == 1 and "cannot reach Temporal" in err and "Traceback" not in err
    code, _, err = await keel(
        None,
        "worker",
        "--agents",
        "examples.helpdesk.agents:AGENTS",
        env={"TEMPORAL_ADDRESS": "127.0.0.1:1", "KEEL_WORKER_CONNECT_SECONDS": "1"},
    )
    assert code == 1 and "Traceback" not in err and "127.0.0.1:1" in err


async def test_a_refusal_reads_as_the_reason_alone(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("shop", "charge 30")
        call_id = (await wait_for(lambda: _pending(harness, run)))["call_id"]
        code, _, err = await keel(harness, "approve", run, call_id, "--as", "mallory")
        await harness.agents.cancel(run)
    assert code == 1
    assert err.strip() == "keel: 'mallory' may not decide this call (allowed: alice, bob)"
