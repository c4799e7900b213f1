"""The `keel` command line against the real server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for

KEEL = str(Path(sys.executable).parent / "keel")


async def keel(
    h: Harness | None, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    e = dict(os.environ)
    e.pop("OPENAI_API_KEY", None)
    e.pop("OPENAI_BASE_URL", None)
    if h is not None:
        e["TEMPORAL_ADDRESS"] = h.client.service_client.config.target_host
        e["KEEL_TASK_QUEUE"] = h.settings.task_queue
    e.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        KEEL,
        *args,
        env=e,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
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


async def test_a_run_waiting_on_a_queue_no_worker_polls_says_which(harness: Harness) -> None:
    """A worker on another task queue: `--wait` says so at once, naming the queue, and
    `--task-queue` starts the run where the worker is."""
    elsewhere = {"KEEL_TASK_QUEUE": f"{harness.settings.task_queue}-elsewhere"}
    queue = elsewhere["KEEL_TASK_QUEUE"]
    run = f"cli-lost-{queue}"
    async with harness.running():
        code, out, err = await keel(
            harness, "start", "calc", "add 2 and 3", "--id", run, "--wait", env=elsewhere
        )
        assert code == 1 and "Traceback" not in err, err
        assert f"run {run} waits on task queue {queue!r}, where no worker is polling" in err
        assert f"keel result {run}" in err
        code, out, err = await keel(harness, "status", run)
        assert code == 1 and f"no worker is serving task queue {queue!r}" in err, err
        code, out, err = await keel(harness, "result", run)
        assert code == 1 and f"waits on task queue {queue!r}" in err, err
        await harness.client.get_workflow_handle(run).terminate()
        # started on the worker's queue, the same command answers
        found = f"cli-found-{queue}"
        code, out, err = await keel(
            harness,
            "start",
            "calc",
            "add 2 and 3",
            "--id",
            found,
            "--task-queue",
            harness.settings.task_queue,
            "--wait",
            env=elsewhere,
        )
        assert (code, out.strip()) == (0, "The sum is 5."), err
        code, out, err = await keel(harness, "status", found, env=elsewhere)
    assert code == 0 and f"  task queue: {harness.settings.task_queue}" in out.splitlines()


def test_a_reader_that_stops_early_ends_the_output_quietly() -> None:
    """`keel list | head -3`: the reader leaves before the output ends; no traceback."""
    for args in (["keygen"], ["--help"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        try:
            done = subprocess.run([KEEL, *args], stdout=write, stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(write)
        assert (done.returncode, done.stderr.decode()) == (0, ""), args


async def test_an_approver_key_file_is_read_one_way(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEEL_APPROVER_KEY and `--key` are read by the same code: `~` is the home directory
    for both, and a file that cannot be used is refused in the same words."""
    from keel.client.api import AgentClient
    from tests.policies import key_pair, make_policy
    from tests.test_approvals import pending

    keys = {"alice": key_pair()}
    (tmp_path / "alice.key").write_bytes(keys["alice"].pem)
    (tmp_path / "bad.key").write_text("not a key")
    monkeypatch.setenv("HOME", str(tmp_path))
    alice = AgentClient(
        harness.client, dataclasses.replace(harness.settings, approver_key="~/alice.key")
    )
    async with harness.worker(policy=make_policy(keys)):
        run = await harness.start("guarded", "charge 30", user="dana")
        call = (await pending(harness, run)).pending_approvals[0].call_id
        code, _, err = await keel(
            harness,
            "approve",
            run,
            call,
            "--as",
            "alice",
            "--key",
            "~/bad.key",
            env={"HOME": str(tmp_path)},
        )
        assert code == 1 and "Traceback" not in err
        assert err.startswith("keel: --key ~/bad.key: the key file is neither a PEM nor base64")
        receipt = await alice.approve(run, call, "alice")
        await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert receipt.accepted
    assert [(d.by, d.signed) for d in state.decisions] == [("alice", True)]
