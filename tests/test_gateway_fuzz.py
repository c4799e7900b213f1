"""The API fuzzed from its own OpenAPI schema (schemathesis): requests of every shape, valid
and not, answer no 5xx and no traceback, every error is a problem, each response is what the
schema says; and requests that are refused change nothing in the runs they name.

Schemathesis draws cases in a thread of their own (Hypothesis runs synchronously); each case
is sent to the app on the test's event loop, where the Temporal worker runs too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Harness
from tests.test_gateway import PROBLEM, Api, gateway_for, open_call, start

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 60  # per generation mode and phase: enough to reach every route's refusals


@pytest.fixture
def api(harness: Harness, tmp_path: Path) -> Api:
    return gateway_for(harness, tmp_path)


def fuzz(
    api: Api,
    user: str,
    loop: asyncio.AbstractEventLoop,
    *,
    path_parameters: dict[str, str] | None = None,
    keep: Callable[[httpx.Response], None] | None = None,
    exclude_paths: tuple[str, ...] = (),
) -> int:
    """Send generated requests as `user` (in this thread; the app runs on `loop`); returns how
    many were sent."""
    # the caller's runs as they change is a stream that never ends
    schema = schemathesis.openapi.from_dict(api.app.openapi()).exclude(
        path=["/api/events", *exclude_paths]
    )
    client = api.as_(user, timeout=60)
    sent = 0

    def send(case: Any) -> httpx.Response:
        kw = case.as_transport_kwargs(base_url="http://keel.test")
        request = client.build_request(
            kw["method"],
            kw["url"],
            params=kw.get("params"),
            headers={**client.headers, **(kw.get("headers") or {})},
            json=kw.get("json"),
            content=kw.get("data"),
            cookies=kw.get("cookies"),
        )
        return asyncio.run_coroutine_threadsafe(client.send(request), loop).result(60)

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=schema.as_strategy(mode, path_parameters=path_parameters))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            nonlocal sent
            r = send(case)
            sent += 1
            case.validate_response(r, checks=CHECKS)
            assert r.status_code < 500, (case.method, case.formatted_path, r.text)
            assert "Traceback" not in r.text
            if r.status_code >= 400:
                assert r.headers["content-type"] == PROBLEM, r.text
                assert r.json()["status"] == r.status_code
            if keep is not None:
                keep(r)

        check()
    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(60)
    return sent


async def _history(api: Api, run: str) -> int:
    return len((await api.harness.client.get_workflow_handle(run).fetch_history()).events)


async def test_the_api_fuzzed_from_its_schema(api: Api) -> None:
    """Anything at all, as a user who may start nothing: never a 5xx or a traceback."""
    loop = asyncio.get_running_loop()
    statuses: set[int] = set()
    async with api.harness.worker(policy=api.policy):
        sent = await asyncio.to_thread(
            fuzz, api, "viewer", loop, keep=lambda r: statuses.add(r.status_code)
        )
    assert sent >= EXAMPLES
    # it reached past the door: answers, refusals, missing runs and bad shapes
    assert {200, 403, 404, 422} <= statuses, statuses


async def test_refused_requests_change_nothing(api: Api) -> None:
    """Every route on another tenant's run is a 404, and decisions by a caller who may not
    decide are refused: the runs' histories keep their length, nothing is charged."""
    loop = asyncio.get_running_loop()
    async with (
        api.harness.worker(policy=api.policy),
        api.as_("dana") as dana,
        api.as_("sam") as sam,
    ):
        theirs = await start(dana, "guarded", "charge 30")
        ours = await start(sam, "guarded", "charge 40")
        calls = {
            run: await open_call(dana if run == theirs else sam, run) for run in (theirs, ours)
        }
        before = {run: await _history(api, run) for run in calls}
        statuses: set[int] = set()

        def refused(r: httpx.Response) -> None:
            statuses.add(r.status_code)
            assert r.status_code >= 400, r.text

        await asyncio.to_thread(
            fuzz,
            api,
            "gail",
            loop,
            path_parameters={"run_id": theirs, "call_id": calls[theirs]},
            keep=refused,
            exclude_paths=("/api/runs", "/api/approvals", "/api/me", "/api/session"),
        )
        decide = "/api/runs/{run_id}/approvals/{call_id}"
        routes = [p for p in api.app.openapi()["paths"] if p != decide]
        await asyncio.to_thread(
            fuzz,
            api,
            "sam",  # a customer: may not decide calls of charge
            loop,
            path_parameters={"run_id": ours, "call_id": calls[ours]},
            keep=refused,
            exclude_paths=tuple(routes),
        )
        after = {run: await _history(api, run) for run in calls}
        await dana.post(f"/api/runs/{theirs}/cancel")
        await sam.post(f"/api/runs/{ours}/cancel")
    assert after == before
    assert 404 in statuses and 403 in statuses
    assert api.harness.ledger.rows("refunds") == []
