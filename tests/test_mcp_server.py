"""`keel mcp` driven by the `mcp` package's own client, as an MCP client a person uses would
drive it: over stdio (a `keel mcp` process per person) and over streamable HTTP (one
`keel mcp --http` process, a bearer token per person), against the real dev server, a worker
with the tests' policy and the scripted model."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from keel.activities.registry import load_policy
from keel.gateway.auth import new_token
from keel.workflows.models import Policy
from tests.conftest import Harness, wait_for
from tests.policies import KeyPair, key_pair, policy_data
from tests.test_cli import keel as keel_cli
from tests.test_gateway import write_tokens

ROOT = Path(__file__).resolve().parent.parent
KEEL = str(Path(sys.executable).parent / "keel")
USERS = ("dana", "sam", "gail", "alice")


class Setup:
    """The policy and tokens files, and the environment a `keel mcp` process gets."""

    def __init__(
        self, harness: Harness, tmp_path: Path, keys: dict[str, KeyPair] | None = None
    ) -> None:
        self.harness = harness
        (tmp_path / "policy.json").write_text(json.dumps(policy_data(keys)))
        self.policy: Policy = load_policy(tmp_path / "policy.json")
        self.tokens = {u: new_token() for u in USERS}
        self.tokens_file = tmp_path / "tokens.toml"
        write_tokens(self.tokens_file, self.tokens)
        self.env = {
            "TEMPORAL_ADDRESS": harness.client.service_client.config.target_host,
            "KEEL_TASK_QUEUE": harness.settings.task_queue,
            "KEEL_POLICY": str(tmp_path / "policy.json"),
            "KEEL_AGENTS": "tests.agents:TEST_AGENTS",
            "KEEL_API_TOKENS": str(self.tokens_file),
            "KEEL_API_RATE": "1000",
        }

    @asynccontextmanager
    async def stdio(self, user: str, **env: str) -> AsyncIterator[Tools]:
        """A `keel mcp` process acting as `user`, and a client session with it."""
        params = StdioServerParameters(
            command=KEEL, args=["mcp"], env={**self.env, "KEEL_USER": user, **env}, cwd=str(ROOT)
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield Tools(s)

    @asynccontextmanager
    async def http(self, url: str, user: str) -> AsyncIterator[Tools]:
        """A client session with a `keel mcp --http` server, with `user`'s token."""
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        async with (
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0, read=None)) as http,
            streamable_http_client(url, http_client=http) as (read, write, _),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            yield Tools(s)


class Tools:
    """Calls of a session's tools: `ok` for an answer, `refused` for a tool error."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, name: str, **args: Any) -> CallToolResult:
        return await self.session.call_tool(name, args)

    async def ok(self, name: str, **args: Any) -> dict[str, Any]:
        r = await self.call(name, **args)
        assert not r.isError, r.content
        assert r.structuredContent is not None and r.content[0].text  # type: ignore[union-attr]
        return r.structuredContent

    async def refused(self, name: str, **args: Any) -> str:
        r = await self.call(name, **args)
        assert r.isError, r
        text: str = r.content[0].text  # type: ignore[union-attr]
        assert "Traceback" not in text
        return text

    async def settled(self, run: str, status: str) -> dict[str, Any]:
        """wait_for_run until the run reaches `status` (each call waits at most 60 s)."""
        while True:
            waited = await self.ok("wait_for_run", run_id=run, timeout_seconds=60)
            if waited["reached"] and waited["run"]["status"] == status:
                return waited["run"]
            assert waited["run"]["status"] not in ("completed", "failed", "cancelled"), waited

    async def call_id(self, run: str) -> str:
        view = await self.settled(run, "waiting_approval")
        return str(view["pending_approvals"][0]["call_id"])


@pytest.fixture
def setup(harness: Harness, tmp_path: Path) -> Setup:
    return Setup(harness, tmp_path)


async def test_stdio_start_approve_reject_edit_and_message(setup: Setup) -> None:
    h = setup.harness
    async with (
        h.worker(policy=setup.policy),
        setup.stdio("dana") as dana,
        setup.stdio("alice") as alice,
        setup.stdio("sam") as sam,
    ):
        names = {t.name for t in (await dana.session.list_tools()).tools}
        assert {"start_run", "wait_for_run", "pending_approvals", "approve_call"} <= names
        # the agents sam's roles let him start, described from KEEL_AGENTS and the policy
        agents = (await sam.ok("list_agents"))["agents"]
        assert {a["name"] for a in agents} == {"guarded", "guarded-open", "calc", "chat"}
        guarded = next(a for a in agents if a["name"] == "guarded")
        charge = next(t for t in guarded["tools"] if t["name"] == "charge")
        assert charge["approval"] == "when amount > 20" and charge["side_effects"]
        assert [t["name"] for t in next(a for a in agents if a["name"] == "chat")["tools"]] == [
            "add"
        ]
        assert "may not start agent 'adder'" in await sam.refused(
            "start_run", agent="adder", message="add 2 and 3"
        )

        run = (await dana.ok("start_run", agent="guarded", message="charge 30"))["run_id"]
        call = await dana.call_id(run)
        inbox = (await alice.ok("pending_approvals"))["approvals"]
        mine = next(p for p in inbox if p["run_id"] == run)
        assert (mine["call_id"], mine["tool"], mine["arguments"]["amount"]) == (call, "charge", 30)
        assert "amount" in mine["parameters"]["properties"]
        # the run's own rules: dana may not approve her own side effect (four-eyes)
        assert "four-eyes: 'dana'" in await dana.refused("approve_call", run_id=run, call_id=call)
        receipt = await alice.ok("approve_call", run_id=run, call_id=call)
        assert receipt["approver"] == "alice" and receipt["accepted"]
        assert "already decided" in await alice.refused("approve_call", run_id=run, call_id=call)
        await dana.settled(run, "completed")
        result = await dana.ok("run_result", run_id=run)
        assert result["status"] == "completed" and result["final_answer"].startswith("Done:")

        # a rejection's reason is what the model sees; an edit runs with the changed amount
        rejected = (await dana.ok("start_run", agent="guarded", message="charge 40"))["run_id"]
        await alice.ok(
            "reject_call",
            run_id=rejected,
            call_id=await dana.call_id(rejected),
            reason="too much for a test",
        )
        edited = (await dana.ok("start_run", agent="guarded", message="charge 50"))["run_id"]
        receipt = await alice.ok(
            "edit_call", run_id=edited, call_id=await dana.call_id(edited), arguments={"amount": 25}
        )
        assert receipt["arguments"] == {"amount": 25, "note": "test"}
        await dana.settled(rejected, "completed")
        answer = (await dana.ok("run_result", run_id=rejected))["final_answer"]
        assert answer == "The tool reported: Rejected by alice: too much for a test"
        await dana.settled(edited, "completed")
        page = await dana.ok("run_transcript", run_id=rejected)
        assert [m["role"] for m in page["messages"]][-2:] == ["tool", "assistant"]

        # a message, with its policy, to a run that keeps its conversation open
        chat = (await sam.ok("start_run", agent="chat", message="say hello"))["run_id"]
        await sam.settled(chat, "idle")
        receipt = await sam.ok("send_message", run_id=chat, text="add 2 and 3", policy="queue")
        assert receipt["status"] in ("queued", "delivered") and receipt["policy"] == "queue"
        await wait_for(lambda: _answered(sam, chat, "The sum is 5."))
        assert (await sam.ok("cancel_run", run_id=chat))["detail"] == "cancel requested"
        await sam.settled(chat, "cancelled")
    assert sorted(r["amount"] for r in h.ledger.rows("refunds")) == [25, 30]


async def _answered(tools: Tools, run: str, answer: str) -> bool:
    r = await tools.call("run_result", run_id=run)
    return not r.isError and (r.structuredContent or {}).get("final_answer") == answer


async def test_stdio_bad_arguments_and_no_user(setup: Setup) -> None:
    async with setup.harness.worker(policy=setup.policy), setup.stdio("sam") as sam:
        text = await sam.refused("approve_call", run_id="some-run")
        assert text == "invalid arguments for approve_call: call_id: Field required"
        text = await sam.refused("start_run", agent="", message="hello")
        assert text.startswith("invalid arguments for start_run: agent: String should have")
        text = await sam.refused("send_message", run_id="some-run", text="hi", policy="shout")
        assert "policy: Input should be 'queue', 'interrupt', 'rollback' or 'reject'" in text
        text = await sam.refused("wait_for_run", run_id="some-run", timeout_seconds=10_000)
        assert "timeout_seconds: Input should be less than or equal to 300" in text
        text = await sam.refused("edit_call", run_id="r", call_id="c", arguments="all of it")
        assert (
            text == "invalid arguments for edit_call: arguments: Input should be a valid dictionary"
        )
        assert (await sam.call("no_such_tool")).isError
    env = {**setup.env, "KEEL_USER": ""}
    code, out, err = await keel_cli(setup.harness, "mcp", env=env, cwd=ROOT)
    assert code == 1 and out == "" and "--user NAME or KEEL_USER" in err
    assert "Traceback" not in err


async def test_stdio_decisions_signed_with_the_users_key(harness: Harness, tmp_path: Path) -> None:
    keys = {"alice": key_pair(), "dana": key_pair()}
    (tmp_path / "alice.key").write_bytes(keys["alice"].pem)
    setup = Setup(harness, tmp_path, keys)
    async with (
        harness.worker(policy=setup.policy),
        setup.stdio("dana") as dana,
        setup.stdio("alice", KEEL_APPROVER_KEY=str(tmp_path / "alice.key")) as alice,
    ):
        run = (await dana.ok("start_run", agent="guarded", message="charge 30"))["run_id"]
        call = await dana.call_id(run)
        # dana may reject her own run's call, but her server holds no key of hers
        text = await dana.refused("reject_call", run_id=run, call_id=call, reason="no")
        assert "unsigned decision refused" in text
        await alice.ok("approve_call", run_id=run, call_id=call)
        await dana.settled(run, "completed")
        state = await harness.agents.get_state(run)
    assert [(d.by, d.signed) for d in state.decisions] == [("alice", True)]


async def test_http_tokens_tenancy_and_approval(setup: Setup) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mcp"
    proc = await asyncio.create_subprocess_exec(
        KEEL,
        "mcp",
        "--http",
        "--port",
        str(port),
        env={**os.environ, **setup.env},
        cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    rest: asyncio.Task[bytes] | None = None
    try:
        rest = await _listening(proc)
        hello = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        }
        accept = {"Accept": "application/json, text/event-stream"}

        async def answer(token: str | None) -> httpx.Response:
            headers = accept | ({"Authorization": f"Bearer {token}"} if token else {})
            async with httpx.AsyncClient() as c:
                return await c.post(url, json=hello, headers=headers)

        assert (await answer(None)).status_code == 401
        wrong = await answer("keel_not-a-token")
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        assert (await answer(setup.tokens["sam"])).status_code == 200

        async with (
            setup.harness.worker(policy=setup.policy),
            setup.http(url, "dana") as dana,
            setup.http(url, "alice") as alice,
        ):
            run = (await dana.ok("start_run", agent="guarded", message="charge 30"))["run_id"]
            assert (await dana.ok("run_status", run_id=run))["user"] == "dana"
            call = await dana.call_id(run)
            history = await _history_length(setup.harness, run)
            # another tenant, and a user of the same tenant who sees only their own runs:
            # the run does not exist for them, in the words a missing run gets
            for user in ("gail", "sam"):
                async with setup.http(url, user) as other:
                    for name, args in _acts(run, call):
                        assert await other.refused(name, **args) == f"run {run} not found"
                    pending = (await other.ok("pending_approvals"))["approvals"]
                    assert run not in {p["run_id"] for p in pending}
                    listed = (await other.ok("list_runs"))["runs"]
                    assert run not in {r["run_id"] for r in listed}
            for name, args in _acts("no-such-run", call):
                assert await dana.refused(name, **args) == "run no-such-run not found"
            assert await _history_length(setup.harness, run) == history  # nothing reached it
            await alice.ok("approve_call", run_id=run, call_id=call)
            await dana.settled(run, "completed")
            result = await dana.ok("run_result", run_id=run)
            assert result["final_answer"].startswith("Done:")
        assert [r["amount"] for r in setup.harness.ledger.rows("refunds")] == [30]
    finally:
        proc.terminate()
        await proc.wait()
        if rest is not None:
            await rest


async def _listening(proc: asyncio.subprocess.Process) -> asyncio.Task[bytes]:
    """Once the server says it listens (its log line); its log, should it stop first. The
    task returned reads the rest of its log, so the pipe never fills and blocks it."""
    assert proc.stderr is not None
    said = []
    while not said or "Uvicorn running on" not in said[-1]:
        line = (await proc.stderr.readline()).decode()
        assert line, "keel mcp --http stopped:\n" + "".join(said)
        said.append(line)
    return asyncio.create_task(proc.stderr.read())


def _acts(run: str, call: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("run_status", {"run_id": run}),
        ("run_transcript", {"run_id": run}),
        ("run_result", {"run_id": run}),
        ("wait_for_run", {"run_id": run, "timeout_seconds": 0}),
        ("send_message", {"run_id": run, "text": "hello"}),
        ("approve_call", {"run_id": run, "call_id": call}),
        ("reject_call", {"run_id": run, "call_id": call, "reason": "no"}),
        ("edit_call", {"run_id": run, "call_id": call, "arguments": {"amount": 1}}),
        ("cancel_run", {"run_id": run}),
    ]


async def _history_length(h: Harness, run: str) -> int:
    history = await h.client.get_workflow_handle(run).fetch_history()
    return len(history.events)
