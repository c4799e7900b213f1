"""The HTTP API (`keel serve`) against the real dev server and scripted model, in process
(httpx's ASGI transport): runs, approvals, messages, tenancy, sign-in, problems, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from keel.client.api import AgentClient, KeelClientError
from keel.config import Settings
from keel.gateway import create_app
from keel.gateway.auth import TokenFile, new_token, token_entry, token_hash
from keel.workflows.models import Policy
from tests.conftest import Harness, wait_for
from tests.policies import KeyPair, key_pair, make_policy, policy_data
from tests.test_cli import keel as keel_cli

USERS = ("dana", "sam", "gail", "alice", "mallory", "root", "viewer", "gwen")
PROBLEM = "application/problem+json"


@dataclasses.dataclass
class Api:
    """The gateway's app over a harness, a token for each user, and clients acting as them."""

    app: FastAPI
    tokens: dict[str, str]
    tokens_file: Path
    harness: Harness
    policy: Policy

    def as_(self, user: str | None, **kw: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://keel.test",
            headers=headers | kw.pop("headers", {}),
            **kw,
        )


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    path.write_text("".join(token_entry(u, f"{u}-test", t) for u, t in tokens.items()))


def gateway_for(
    harness: Harness,
    tmp_path: Path,
    policy_json: dict[str, Any] | None = None,
    **settings: Any,
) -> Api:
    """An app serving the harness's runs, with the tests' policy (or `policy_json`)."""
    data = policy_json or policy_data()
    data["users"].setdefault("viewer", {"roles": []})  # starts nothing, sees their own
    # of gail's tenant, and with no runs but those of the test that uses her
    data["users"].setdefault("gwen", {"roles": ["customer"], "tenant": "globex"})
    (tmp_path / "policy.json").write_text(json.dumps(data))
    tokens = {u: new_token() for u in USERS}
    write_tokens(tmp_path / "tokens.toml", tokens)
    s = Settings(
        task_queue=harness.settings.task_queue,
        policy_file=str(tmp_path / "policy.json"),
        api_tokens=str(tmp_path / "tokens.toml"),
        **{"api_rate": 1000.0, **settings},
    )
    app = create_app(s, client=harness.client)
    return Api(app, tokens, tmp_path / "tokens.toml", harness, app.state.gateway.policy)


@pytest.fixture
def api(harness: Harness, tmp_path: Path) -> Api:
    return gateway_for(harness, tmp_path)


def problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """The response is a problem of `status` whose detail says `words`."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM, r.headers
    doc = r.json()
    assert doc["status"] == status and doc["type"].startswith("https://keel.dev/problems/")
    assert doc["instance"] == r.request.url.path and "Traceback" not in r.text
    for w in words:
        assert w in doc["detail"], doc
    return doc


async def run_status(c: httpx.AsyncClient, run: str, *statuses: str) -> dict[str, Any] | None:
    r = await c.get(f"/api/runs/{run}")
    doc = r.json() if r.status_code == 200 else {}
    return doc if doc.get("status") in statuses else None


async def open_call(c: httpx.AsyncClient, run: str) -> str:
    """The call id of the run's first open approval, once it asks."""
    doc = await wait_for(lambda: run_status(c, run, "waiting_approval"))
    return str(doc["pending_approvals"][0]["call_id"])


async def start(c: httpx.AsyncClient, agent: str, message: str) -> str:
    r = await c.post("/api/runs", json={"agent": agent, "message": message})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


async def test_start_list_status_state_transcript(api: Api) -> None:
    async with api.harness.worker(policy=api.policy), api.as_("sam") as sam:
        r = await sam.get("/api/me")
        assert r.json() == {"user": "sam", "roles": ["customer"], "tenant": "acme", "sees": "own"}
        run = await start(sam, "calc", "add 2 and 3")
        view = await wait_for(lambda: run_status(sam, run, "completed"))
        assert (view["agent"], view["user"], view["step"]) == ("calc", "sam", 2)
        assert view["usage"]["total_tokens"] > 0 and view["keeps_open"] is False
        listed = await wait_for(lambda: _listed(sam, run, "?agent=calc&status=completed"))
        assert listed["agent"] == "calc" and listed["user"] == "sam"
        state = (await sam.get(f"/api/runs/{run}/state")).json()
        assert state["final_answer"] == "The sum is 5." and state["status"] == "completed"
        page = (await sam.get(f"/api/runs/{run}/transcript")).json()
        assert [m["role"] for m in page["messages"]] == [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
        ]
        end = (await sam.get(f"/api/runs/{run}/transcript?start={page['total']}")).json()
        assert end["messages"] == [] and end["final_answer"] == "The sum is 5."
    # a finished run is still described with no worker, from Temporal's record
    async with api.as_("sam") as sam:
        view = (await sam.get(f"/api/runs/{run}")).json()
        assert view["status"] == "completed" and view["temporal_status"] == "completed"
        problem(await sam.get(f"/api/runs/{run}/state"), 503, "no worker is serving")


async def _listed(c: httpx.AsyncClient, run: str, query: str = "") -> dict[str, Any] | None:
    runs = (await c.get(f"/api/runs{query}")).json()["runs"]
    return next((r for r in runs if r["run_id"] == run), None)


async def test_every_refusal_is_a_problem_with_the_reason(api: Api) -> None:
    async with api.as_(None) as anon:
        problem(await anon.get("/api/runs"), 401, "sign in first")
    async with api.as_(None, headers={"Authorization": "Bearer keel_nope"}) as wrong:
        problem(await wrong.get("/api/me"), 401, "not known")
    async with api.harness.worker(policy=api.policy), api.as_("sam") as sam:
        problem(await sam.get("/api/runs/no-such-run"), 404, "run no-such-run not found")
        problem(await sam.post("/api/runs", json={"agent": "calc"}), 422, "message")
        problem(await sam.get("/api/runs?status=bogus"), 422, "status")
        problem(await sam.get("/api/nowhere"), 404)
        problem(await sam.delete("/api/runs"), 405)
        problem(await sam.get("/api/runs/x/events", headers={"Last-Event-ID": "x"}), 404)
        # the same words AgentClient (and so the CLI) gives
        as_sam = AgentClient(
            api.harness.client, api.harness.settings, as_user="sam", policy=api.policy
        )
        with pytest.raises(KeelClientError) as refused:
            await as_sam.start("shop", "charge 30")
        problem(
            await sam.post("/api/runs", json={"agent": "shop", "message": "charge 30"}),
            403,
            str(refused.value),
        )
        run = await start(sam, "calc", "add 1 and 1")
        r = await sam.post("/api/runs", json={"agent": "calc", "message": "x", "run_id": run})
        problem(r, 409, "is taken")
        await wait_for(lambda: run_status(sam, run, "completed"))
        r = await sam.post(f"/api/runs/{run}/messages", json={"text": "more"})
        problem(r, 409, f"run {run} has ended (completed)")
        problem(await sam.post(f"/api/runs/{run}/cancel"), 409, "has ended")
        problem(await sam.get(f"/api/runs/{run}/events", headers={"Last-Event-ID": "x"}), 422)


async def test_approve_reject_edit_from_the_api(api: Api) -> None:
    async with (
        api.harness.worker(policy=api.policy),
        api.as_("dana") as dana,
        api.as_("alice") as alice,
    ):
        run = await start(dana, "guarded-open", "charge 30")  # idle after it: still open
        call = await open_call(dana, run)
        url = f"/api/runs/{run}/approvals/{call}"
        # the inbox: alice (an approver of dana's tenant) sees it, with the tool's schema
        inbox = (await alice.get("/api/approvals")).json()["approvals"]
        mine = next(p for p in inbox if p["run_id"] == run)
        assert (mine["call_id"], mine["tool"], mine["arguments"]["amount"]) == (call, "charge", 30)
        assert "amount" in mine["parameters"]["properties"] and mine["expires_at"]
        # refusals: the run's own reasons, nothing decided
        problem(await dana.post(url, json={"decision": "approve"}), 403, "four-eyes: 'dana'")
        r = await alice.post(url, json={"decision": "edit", "arguments": {"amount": "lots"}})
        problem(r, 422, "edited arguments are invalid: amount")
        problem(await alice.post(url, json={"decision": "edit"}), 422, "an edit must carry")
        problem(await alice.post(url, json={"decision": "maybe"}), 422, "decision")
        r = await alice.post(url, json={"decision": "approve", "approver": "dana"})
        problem(
            await alice.post(f"/api/runs/{run}/approvals/nope", json={"decision": "approve"}),
            409,
            "no pending approval with call id 'nope'",
        )
        # the body's approver (above) is no field: the approver is always the caller
        receipt = r.json()
        assert r.status_code == 200 and receipt["approver"] == "alice" and receipt["accepted"]
        problem(await alice.post(url, json={"decision": "approve"}), 409, "already decided")
        await wait_for(lambda: run_status(dana, run, "idle"))
        await dana.post(f"/api/runs/{run}/cancel")
        # a reject reaches the model; an edit runs with the merged arguments
        rejected = await start(dana, "guarded", "charge 40")
        r = await alice.post(
            f"/api/runs/{rejected}/approvals/{await open_call(dana, rejected)}",
            json={"decision": "reject", "reason": "too much for a test"},
        )
        assert r.status_code == 200 and r.json()["decision"] == "reject"
        edited = await start(dana, "guarded", "charge 50")
        r = await alice.post(
            f"/api/runs/{edited}/approvals/{await open_call(dana, edited)}",
            json={"decision": "edit", "arguments": {"amount": 25}},
        )
        assert r.json()["arguments"] == {"amount": 25, "note": "test"}
        done = await wait_for(lambda: run_status(dana, rejected, "completed"))
        await wait_for(lambda: run_status(dana, edited, "completed"))
        state = (await dana.get(f"/api/runs/{rejected}/state")).json()
    assert (
        done
        and state["final_answer"] == "The tool reported: Rejected by alice: too much for a test"
    )
    assert sorted(r["amount"] for r in api.harness.ledger.rows("refunds")) == [25, 30]


async def test_messages_with_the_four_policies(api: Api) -> None:
    h = api.harness
    async with h.worker(policy=api.policy), api.as_("sam") as sam:
        run = await start(sam, "chat", "say hello")
        await wait_for(lambda: run_status(sam, run, "idle"))
        msgs = f"/api/runs/{run}/messages"
        r = await sam.post(msgs, json={"text": "take a moment", "policy": "queue", "id": "m1"})
        assert r.json()["status"] == "delivered"
        await wait_for(lambda: h.model.held("moment") >= 1)
        # while a turn is in flight: reject refuses, queue waits, interrupt and rollback stop it
        problem(await sam.post(msgs, json={"text": "hurry", "policy": "reject"}), 409, "in flight")
        r = await sam.post(msgs, json={"text": "take a moment", "policy": "queue", "id": "m1"})
        assert r.json()["status"] in ("delivered", "duplicate")  # sent again: taken once
        r = await sam.post(msgs, json={"text": "say hello", "policy": "interrupt"})
        assert (r.json()["status"], r.json()["policy"]) == ("queued", "interrupt")
        view = await wait_for(lambda: run_status(sam, run, "idle"))
        r = await sam.post(msgs, json={"text": "take a moment", "policy": "queue"})
        await wait_for(lambda: h.model.held("moment") >= 1)
        r = await sam.post(msgs, json={"text": "add 2 and 3", "policy": "rollback"})
        assert r.json()["status"] == "queued" and r.json()["policy"] == "rollback"
        await wait_for(lambda: _answered(sam, run, "The sum is 5."))
        state = (await sam.get(f"/api/runs/{run}/state")).json()
        h.model.release("moment")
        problem(await sam.post(msgs, json={"text": ""}), 422, "text")
        assert (await sam.post(f"/api/runs/{run}/cancel")).status_code == 202
    assert view["status"] == "idle"
    kinds = [a["kind"] for a in state["audit"]]
    assert "interrupted" in kinds and "rolled_back" in kinds
    senders = {a["actor"] for a in state["audit"] if a["kind"] == "message"}
    assert senders <= {"sam"}  # the sender is the caller


async def _answered(c: httpx.AsyncClient, run: str, answer: str) -> bool:
    state = (await c.get(f"/api/runs/{run}/state")).json()
    return state["status"] == "idle" and state["final_answer"] == answer


async def test_cancel_and_resume(api: Api) -> None:
    async with api.harness.worker(policy=api.policy), api.as_("dana") as dana:
        run = await start(dana, "guarded", "charge 30")
        await open_call(dana, run)
        r = await dana.post(f"/api/runs/{run}/resume")
        assert r.status_code == 202 and r.json()["run_id"] == run
        r = await dana.post(f"/api/runs/{run}/cancel")
        assert r.status_code == 202
        await wait_for(lambda: run_status(dana, run, "cancelled"))
        problem(await dana.post(f"/api/runs/{run}/cancel"), 409, "has ended (cancelled)")
        problem(await dana.post(f"/api/runs/{run}/resume"), 409, "has ended")
    assert api.harness.ledger.rows("refunds") == []


async def test_a_run_of_another_tenant_is_not_found_anywhere(api: Api) -> None:
    async with api.harness.worker(policy=api.policy), api.as_("dana") as dana:
        run = await start(dana, "guarded", "charge 30")
        call = await open_call(dana, run)
        history = await _history_length(api, run)
        for user in ("gail", "sam", "mallory"):  # another tenant; the same tenant, sees own
            async with api.as_(user) as other:
                for method, path, body in _routes(run, call):
                    r = await other.request(method, path, json=body)
                    problem(r, 404, f"run {run} not found")
                assert await _listed(other, run) is None
                listed = (await other.get("/api/approvals")).json()["approvals"]
                assert run not in {p["run_id"] for p in listed}
        assert await _history_length(api, run) == history  # nothing reached the run
        for user in ("alice", "root"):  # an approver of acme; an admin who sees all
            async with api.as_(user) as seer:
                assert (await seer.get(f"/api/runs/{run}")).status_code == 200
                assert await wait_for(lambda: _listed(seer, run))
        await dana.post(f"/api/runs/{run}/cancel")


def _routes(run: str, call: str) -> list[tuple[str, str, Any]]:
    base = f"/api/runs/{run}"
    return [
        ("GET", base, None),
        ("GET", f"{base}/state", None),
        ("GET", f"{base}/transcript", None),
        ("GET", f"{base}/events", None),
        ("GET", f"{base}/agui", None),
        ("POST", f"{base}/messages", {"text": "hello"}),
        ("POST", f"{base}/cancel", None),
        ("POST", f"{base}/resume", None),
        ("POST", f"{base}/approvals/{call}", {"decision": "approve"}),
        ("POST", f"{base}/approvals/{call}", {"decision": "reject", "reason": "no"}),
    ]


async def _history_length(api: Api, run: str) -> int:
    history = await api.harness.client.get_workflow_handle(run).fetch_history()
    return len(history.events)


async def test_decisions_signed_with_the_callers_key(harness: Harness, tmp_path: Path) -> None:
    keys: dict[str, KeyPair] = {"alice": key_pair(), "dana": key_pair()}
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alice.pem").write_bytes(keys["alice"].pem)  # dana's is elsewhere
    api = gateway_for(harness, tmp_path, policy_data(keys), api_signing_keys=str(tmp_path / "keys"))
    async with (
        harness.worker(policy=make_policy(keys)),
        api.as_("dana") as dana,
        api.as_("alice") as alice,
    ):
        run = await start(dana, "guarded", "charge 30")
        call = await open_call(dana, run)
        url = f"/api/runs/{run}/approvals/{call}"
        # dana may reject her own run's call, but the gateway holds no key of hers
        r = await dana.post(url, json={"decision": "reject", "reason": "no"})
        problem(r, 403, "unsigned decision refused")
        r = await alice.post(url, json={"decision": "approve"})
        assert r.status_code == 200, r.text
        await wait_for(lambda: run_status(dana, run, "completed"))
        state = (await dana.get(f"/api/runs/{run}/state")).json()
    assert [(d["by"], d["signed"]) for d in state["decisions"]] == [("alice", True)]


async def test_sign_in_cookie_cors_and_revocation(harness: Harness, tmp_path: Path) -> None:
    api = gateway_for(harness, tmp_path, api_cors_origins=("https://page.example",))
    token = api.tokens["sam"]
    async with api.as_(None) as browser:
        problem(await browser.post("/api/session", json={"token": "keel_wrong"}), 401)
        r = await browser.post("/api/session", json={"token": token})
        assert r.status_code == 204
        cookie = r.headers["set-cookie"]
        assert "keel_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert (await browser.get("/api/me")).json()["user"] == "sam"
        # with the cookie, another site's page may not act
        r = await browser.post("/api/runs/x/cancel", headers={"Origin": "https://evil.example"})
        problem(r, 403, "may not act with the sign-in cookie")
        r = await browser.post("/api/runs/x/cancel", headers={"Origin": "https://page.example"})
        problem(r, 404)
        assert (await browser.delete("/api/session")).status_code == 204
        problem(await browser.get("/api/me"), 401)
        # CORS: only the configured origin is answered
        pre = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        r = await browser.options("/api/runs", headers={"Origin": "https://page.example", **pre})
        assert r.headers["access-control-allow-origin"] == "https://page.example"
        r = await browser.options("/api/runs", headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in r.headers
        r = await browser.get(
            "/api/me",
            headers={"Origin": "https://page.example", "Authorization": f"Bearer {token}"},
        )
        assert r.headers["access-control-allow-origin"] == "https://page.example"
    # revoking: the hash leaves the file, the token stops working at once
    async with api.as_("sam") as sam, api.as_("dana") as dana:
        assert (await sam.get("/api/me")).status_code == 200
        write_tokens(api.tokens_file, {u: t for u, t in api.tokens.items() if u != "sam"})
        os.utime(api.tokens_file, (1, 1))  # a change within the same second shows too
        problem(await sam.get("/api/me"), 401, "not known")
        assert (await dana.get("/api/me")).status_code == 200


async def test_rate_limit_per_caller(harness: Harness, tmp_path: Path) -> None:
    api = gateway_for(harness, tmp_path, api_rate=0.01)  # a burst of one
    async with api.as_("sam") as sam, api.as_("dana") as dana:
        assert (await sam.get("/api/me")).status_code == 200
        doc = problem(await sam.get("/api/me"), 429, "too many requests")
        assert doc["type"].endswith("/rate-limited")
        r = await sam.get("/api/me")
        assert int(r.headers["retry-after"]) >= 1
        assert (await dana.get("/api/me")).status_code == 200  # each caller has their own


async def test_token_new_prints_a_token_and_its_hash(tmp_path: Path) -> None:
    code, out, err = await keel_cli(None, "token", "new", "--user", "ann")
    assert code == 0, err
    token = err.splitlines()[-1]  # shown once, on the terminal; stdout is the file's entry
    assert token.startswith("keel_") and f'sha256 = "{token_hash(token)}"' in out
    assert 'user = "ann"' in out and token not in out
    (tmp_path / "tokens.toml").write_text(out)  # `keel token new ... >> tokens.toml`
    found = TokenFile(str(tmp_path / "tokens.toml")).lookup(token)
    assert found is not None and found[1] == "ann"


async def test_keel_serve_serves_the_api(api: Api, tmp_path: Path) -> None:
    """`keel serve` as a person starts it: settings from the environment, the API on a port."""
    import socket

    code, _, err = await keel_cli(api.harness, "serve", env={"KEEL_API_TOKENS": ""})
    assert code == 1 and "keel serve needs KEEL_API_TOKENS" in err and "Traceback" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": api.harness.client.service_client.config.target_host,
        "KEEL_TASK_QUEUE": api.harness.settings.task_queue,
        "KEEL_API_TOKENS": str(api.tokens_file),
        "KEEL_POLICY": str(tmp_path / "policy.json"),
    }
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "keel"),
        "serve",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    auth = {"Authorization": f"Bearer {api.tokens['alice']}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth) as c:

            async def me() -> dict[str, Any] | None:
                try:
                    return (await c.get("/api/me")).json()
                except httpx.TransportError:
                    return None  # not listening yet

            assert (await wait_for(me))["user"] == "alice"
            assert (await c.get("/")).headers["content-type"].startswith("text/html")
            assert "/api/runs" in (await c.get("/openapi.json")).json()["paths"]
    finally:
        proc.terminate()
        await proc.wait()
