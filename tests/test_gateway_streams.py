"""The API's Server-Sent Events: a run's events resumed by Last-Event-ID, a reply seen while
it is written, the AG-UI stream parsed with ag-ui-protocol's models, and the caller's runs as
they change. Live streams go through a real server (uvicorn on a loopback port): httpx's ASGI
transport hands a response over only once it has ended."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from ag_ui.core import Event, EventType
from fastapi import FastAPI
from pydantic import TypeAdapter

from tests.conftest import Harness, wait_for
from tests.rules import STORY
from tests.test_gateway import Api, gateway_for, open_call, run_status, start

AGUI = TypeAdapter(Event)


@pytest.fixture
def api(harness: Harness, tmp_path: Path) -> Api:
    return gateway_for(harness, tmp_path)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app served by uvicorn on a free loopback port, for as long as the block runs."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def frames(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The SSE events of a response as dicts of their fields (comments skipped)."""
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = f"{event[name]}\n{value}" if name in event else value


async def read_all(c: httpx.AsyncClient, path: str, **headers: str) -> list[dict[str, str]]:
    async with c.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [f async for f in frames(r)]


async def test_events_resume_after_last_event_id_without_duplicates_or_gaps(api: Api) -> None:
    async with api.harness.worker(policy=api.policy), api.as_("sam") as sam:
        run = await start(sam, "calc", "two sums")
        await wait_for(lambda: run_status(sam, run, "completed"))
        path = f"/api/runs/{run}/events"
        whole = await read_all(sam, path)
        ids = [int(f["id"]) for f in whole]
        assert ids == sorted(set(ids)) and ids[0] == 0 and whole[-1]["event"] == "ended"
        assert all(json.loads(f["data"])["kind"] == f["event"] for f in whole)
        kinds = {f["event"] for f in whole}
        assert {"status", "model_reply", "tool_started", "tool_result", "ended"} <= kinds
        for i in range(len(whole)):  # resumed after each event: the rest, each once
            rest = await read_all(sam, path, **{"Last-Event-ID": str(ids[i])})
            assert rest == whole[i + 1 :], i
        assert await read_all(sam, f"{path}?from={ids[2]}") == whole[2:]
        # Last-Event-ID (a reconnect) wins over the page's first ?from=
        assert (
            await read_all(sam, f"{path}?from=0", **{"Last-Event-ID": str(ids[-2])}) == whole[-1:]
        )


async def test_a_reply_is_seen_while_it_is_written_and_a_reconnect_goes_on(api: Api) -> None:
    h = api.harness
    async with h.worker(policy=api.policy), serving(api.app) as url:
        auth = {"Authorization": f"Bearer {api.tokens['sam']}"}
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as sam:
            run = await start(sam, "calc", "tell a story")
            seen: list[dict[str, str]] = []
            async with sam.stream("GET", f"/api/runs/{run}/events") as r:
                async for f in frames(r):
                    seen.append(f)
                    if f["event"] == "model_delta" and json.loads(f["data"])["text"]:
                        break  # the model is held at its gate: this is a part of the reply
            assert h.model.held("story") == 1
            part = "".join(
                json.loads(f["data"])["text"] for f in seen if f["event"] == "model_delta"
            )
            assert part and STORY.startswith(part) and part != STORY
            # the page reconnects where it was; the rest of the reply comes, then the end
            h.model.release("story")
            rest = await read_all(
                sam, f"/api/runs/{run}/events", **{"Last-Event-ID": seen[-1]["id"]}
            )
            agui = await read_all(sam, f"/api/runs/{run}/agui")
    offsets = [int(f["id"]) for f in seen + rest]
    assert offsets == sorted(set(offsets))  # nothing twice
    written = part + "".join(
        json.loads(f["data"])["text"] for f in rest if f["event"] == "model_delta"
    )
    reply = next(json.loads(f["data"]) for f in rest if f["event"] == "model_reply")
    assert reply["text"] == STORY and STORY.startswith(written)
    assert rest[-1]["event"] == "ended" and json.loads(rest[-1]["data"])["status"] == "completed"
    events = [AGUI.validate_json(f["data"]) for f in agui]
    text = "".join(e.delta for e in events if e.type == EventType.TEXT_MESSAGE_CONTENT)
    assert text == STORY and events[-1].type == EventType.RUN_FINISHED


async def test_agui_stream_parses_with_the_protocols_models(api: Api) -> None:
    async with (
        api.harness.worker(policy=api.policy),
        api.as_("dana") as dana,
        api.as_("alice") as alice,
    ):
        run = await start(dana, "guarded", "charge 30")
        call = await open_call(dana, run)
        await alice.post(f"/api/runs/{run}/approvals/{call}", json={"decision": "approve"})
        await wait_for(lambda: run_status(dana, run, "completed"))
        raw = await read_all(dana, f"/api/runs/{run}/agui")
        failed = await start(dana, "calc", "trigger error")
        await wait_for(lambda: run_status(dana, failed, "failed"))
        failing = await read_all(dana, f"/api/runs/{failed}/agui")
    events = [AGUI.validate_json(f["data"]) for f in raw]
    types = [e.type for e in events]
    assert types[0] == EventType.RUN_STARTED and types[-1] == EventType.RUN_FINISHED
    assert events[0].thread_id == events[0].run_id == run
    custom = {e.name: e.value for e in events if e.type == EventType.CUSTOM}
    asked = custom["keel.approval_requested"]
    assert asked["call_id"] == call and json.loads(asked["arguments"])["amount"] == 30
    assert custom["keel.approval_decided"]["by"] == "alice"
    started = next(e for e in events if e.type == EventType.TOOL_CALL_START)
    result = next(e for e in events if e.type == EventType.TOOL_CALL_RESULT)
    assert (started.tool_call_id, started.tool_call_name) == (call, "charge")
    assert result.tool_call_id == call and "30" in result.content
    statuses = [e.snapshot["status"] for e in events if e.type == EventType.STATE_SNAPSHOT]
    assert "waiting_approval" in statuses
    assert types.index(EventType.TEXT_MESSAGE_START) < types.index(EventType.TEXT_MESSAGE_END)
    assert "id" not in raw[0] and raw[-1]["id"]  # a reconnect resumes after a whole event
    ended = AGUI.validate_json(failing[-1]["data"])
    assert ended.type == EventType.RUN_ERROR and ended.code == "failed"


async def test_the_callers_runs_as_they_change_show_only_what_they_may_see(api: Api) -> None:
    h = api.harness
    async with h.worker(policy=api.policy), serving(api.app) as url:
        async with api.as_("dana") as dana, api.as_("gwen") as gwen:
            hidden = await start(dana, "guarded", "charge 30")
            await open_call(dana, hidden)
            mine = await start(gwen, "calc", "add 2 and 3")

            async def watch(user: str, until: str) -> list[dict[str, Any]]:
                got: list[dict[str, Any]] = []
                auth = {"Authorization": f"Bearer {api.tokens[user]}"}
                async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as c:
                    async with c.stream("GET", "/api/events") as r:
                        async for f in frames(r):
                            got.append({"event": f["event"], **json.loads(f["data"])})
                            runs = {e.get("run_id") for e in got}
                            if until in runs and any(e["event"] == "approvals" for e in got):
                                break
                return got

            seen_by_gwen = await watch("gwen", mine)
            seen_by_alice = await watch("alice", hidden)
            await dana.post(f"/api/runs/{hidden}/cancel")
    assert hidden not in {e.get("run_id") for e in seen_by_gwen}
    assert {"event": "approvals", "count": 0} in seen_by_gwen
    assert any(e["event"] == "approvals" and e["count"] >= 1 for e in seen_by_alice)


async def test_many_followers_of_a_run_add_no_history_beyond_one_watcher(api: Api) -> None:
    """Every poll of a run's stream is an update in its history: the gateway follows each run
    once, however many people watch it, and each of them gets every event once."""
    h = api.harness
    async with h.worker(policy=api.policy), serving(api.app) as url:
        auth = {"Authorization": f"Bearer {api.tokens['sam']}"}
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as sam:
            run = await start(sam, "calc", "tell a story")
            await h.model.wait_held("story")
            path = f"/api/runs/{run}/events"
            readers = [asyncio.create_task(read_all(sam, path)) for _ in range(12)]
            await wait_for(lambda: len(api.app.state.gateway.feeds._feeds) == 1)
            feed = api.app.state.gateway.feeds._feeds[run]
            await wait_for(lambda: feed.followers == 12)
            h.model.release("story")
            seen = await asyncio.gather(*readers)
            history = await h.client.get_workflow_handle(run).fetch_history()
    assert all(s == seen[0] for s in seen) and seen[0][-1]["event"] == "ended"
    offsets = [int(f["id"]) for f in seen[0]]
    assert offsets == sorted(set(offsets)) and offsets[0] == 0
    polls = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    # one watcher's polls: at most one per batch of events the run published
    assert 0 < len(polls) <= len({f["id"] for f in seen[0]})
    assert not api.app.state.gateway.feeds._feeds  # the watcher ended with its followers
