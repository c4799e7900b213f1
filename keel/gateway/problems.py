"""Every refusal as `application/problem+json` (RFC 9457), with the reason Keel gives.

A refusal keeps the words the CLI prints for the same request (AgentClient's KeelClientError,
the run's own update validator, Temporal's RPC errors); only its status is chosen here. No
response body ever carries a traceback: an unexpected error is logged and answered with a
plain 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from keel.client.api import KeelClientError, NoWorker
from keel.config import SettingsError

PROBLEM_TYPE = "application/problem+json"
TYPE_BASE = "https://keel.dev/problems/"
SLUGS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    422: "invalid",
    429: "rate-limited",
    500: "internal",
    503: "unavailable",
}
log = logging.getLogger("keel.gateway")

# How a refusal's reason reads, and what it is: the runs' judges (keel.workflows.decisions,
# .authz, .inbox) word them; anything else a run refuses is a conflict with its state.
FORBIDDEN = (
    "may not decide",
    "four-eyes",
    "is not a user of policy",
    "unsigned decision refused",
    "does not verify",
    "has no public key",
    "may not start agent",
    "may start runs only as themselves",
    "is signed at",
)
INVALID = ("edited arguments are invalid", "an edit must carry", "must carry signed_at")
TOO_MANY = ("too many decisions",)


class Problem(Exception):
    """A request refused with this status and reason (`slug` defaults from the status)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or SLUGS.get(status, "error")
        self.headers = dict(headers or {})


class ProblemBody(BaseModel):
    """What every error answers (RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str


def not_found(run_id: str) -> Problem:
    """The same words for a run that does not exist and one the caller may not see."""
    return Problem(404, f"run {run_id} not found")


def refusal(reason: str) -> Problem:
    """A refusal by a run or by AgentClient, with its reason, as the status it is."""
    if any(p in reason for p in TOO_MANY):
        return Problem(429, reason, headers={"Retry-After": "1"})
    if any(p in reason for p in FORBIDDEN):
        return Problem(403, reason)
    if any(p in reason for p in INVALID):
        return Problem(422, reason)
    return Problem(409, reason)


def from_error(e: BaseException) -> Problem | None:
    """The problem an error of Keel's client or of Temporal means (None: not one of those)."""
    if isinstance(e, Problem):
        return e
    if isinstance(e, NoWorker):
        return Problem(503, str(e), slug="no-worker")
    if isinstance(e, KeelClientError):
        return refusal(str(e))
    if isinstance(e, WorkflowAlreadyStartedError):
        return Problem(409, f"run {e.workflow_id} exists already: choose another run_id")
    if isinstance(e, SettingsError):
        return Problem(503, str(e))
    if isinstance(e, RPCError):
        status = {
            RPCStatusCode.NOT_FOUND: 404,
            RPCStatusCode.INVALID_ARGUMENT: 422,
            RPCStatusCode.ALREADY_EXISTS: 409,
            RPCStatusCode.FAILED_PRECONDITION: 409,
            RPCStatusCode.PERMISSION_DENIED: 403,
            RPCStatusCode.RESOURCE_EXHAUSTED: 429,
        }.get(e.status, 503)
        return Problem(status, e.message or "Temporal refused the request")
    return None


def body(status: int, detail: str, instance: str, slug: str | None = None) -> dict[str, Any]:
    """The problem document itself."""
    slug = slug or SLUGS.get(status, "error")
    title = slug.replace("-", " ").capitalize()
    return ProblemBody(
        type=TYPE_BASE + slug, title=title, status=status, detail=detail, instance=instance
    ).model_dump()


def response(request: Request, p: Problem) -> JSONResponse:
    return JSONResponse(
        body(p.status, p.detail, request.url.path, p.slug),
        status_code=p.status,
        headers=p.headers,
        media_type=PROBLEM_TYPE,
    )


def _validation_detail(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


class CatchAll:
    """An error no handler knew: logged with its traceback, answered as a plain 500 problem
    (Starlette's own last resort would re-raise it and may answer in text)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                return  # a stream already under way: it just ends
            doc = body(500, "internal error: the gateway's log has the details", scope["path"])
            raw = json.dumps(doc).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", PROBLEM_TYPE.encode()),
                        (b"content-length", str(len(raw)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": raw})


def install(app: FastAPI) -> None:
    """Answer every error of `app` as a problem."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, e: Problem) -> JSONResponse:
        return response(request, e)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        # a body that is not JSON at all is as invalid as one of the wrong shape: one status
        status = 422 if e.status_code == 400 else e.status_code
        return response(request, Problem(status, detail, headers=e.headers))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return response(request, Problem(422, _validation_detail(e)))

    for kind in (KeelClientError, RPCError, WorkflowAlreadyStartedError, SettingsError):

        @app.exception_handler(kind)
        async def _known(request: Request, e: Exception) -> JSONResponse:
            p = from_error(e)
            assert p is not None
            return response(request, p)

    app.add_middleware(CatchAll)


# The error answers every route documents (OpenAPI), so clients and fuzzers know them.
PROBLEM_CONTENT = {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemBody"}}}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: these statuses, each a problem."""
    return {
        s: {"model": ProblemBody, "description": SLUGS.get(s, "error"), "content": PROBLEM_CONTENT}
        for s in (401, 422, 429, 503, *statuses)
    }
