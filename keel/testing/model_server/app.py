"""The HTTP layer: a Starlette app over a ``ScriptedModel`` (OpenAI's paths, with and without
``/v1``, and the ``/admin`` endpoints tests and scripts use)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .completions import MODEL_ID, error_body
from .rules import RulesError
from .script import Answer, DroppedConnection, ScriptedModel

MODEL_CARD = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "keel"}


def build_app(model: ScriptedModel) -> Starlette:
    """The scripted model's HTTP API."""

    async def chat(request: Request) -> Response:
        return render(await model.answer(await request.body()))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [MODEL_CARD]})

    async def model_card(request: Request) -> Response:
        return JSONResponse(MODEL_CARD)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "url": f"{request.base_url}v1"})

    async def stats(request: Request) -> Response:
        return JSONResponse(model.stats())

    async def requests(request: Request) -> Response:
        return JSONResponse(model.requests())

    async def faults(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(model.faults())
        try:
            data = json.loads(await request.body() or b"[]")
            if isinstance(data, Mapping):
                data = data.get("faults", [])
            if not isinstance(data, list):
                raise RulesError("expected a JSON list of fault specs")
            model.set_faults(data)
        except (ValueError, RulesError) as e:
            return _error(400, f"Invalid request: {e}")
        return JSONResponse({"ok": True, "faults": len(data)})

    async def reset(request: Request) -> Response:
        model.reset()
        return JSONResponse({"ok": True})

    routes = [
        *(Route(f"{v}/chat/completions", chat, methods=["POST"]) for v in ("/v1", "")),
        *(Route(f"{v}/models", models, methods=["GET"]) for v in ("/v1", "")),
        *(Route(f"{v}/models/{MODEL_ID}", model_card, methods=["GET"]) for v in ("/v1", "")),
        *(Route(p, health, methods=["GET"]) for p in ("/", "/health", "/healthz")),
        Route("/admin/stats", stats, methods=["GET"]),
        Route("/admin/requests", requests, methods=["GET"]),
        Route("/admin/faults", faults, methods=["GET", "POST"]),
        Route("/admin/reset", reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.add_middleware(_CloseConnections)
    return app


class _CloseConnections:
    """Every answer closes its connection. On a reused one, a client that writes a request's
    headers and body apart (Nagle's algorithm on, as in httpx and http.client) waits for
    the server's delayed ACK: 40 ms a request, where a fresh connection takes a fraction."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing if scope["type"] == "http" else send)


def render(answer: Answer) -> Response:
    """An answer as OpenAI sends it: a JSON body, or ``chat.completion.chunk`` Server-Sent
    Events for a streamed request."""
    if answer.events is not None:
        return StreamingResponse(
            _server_sent(answer.events), answer.status, answer.headers, "text/event-stream"
        )
    if answer.raw is not None:
        return Response(answer.raw, answer.status, answer.headers, "application/json")
    payload = answer.completion if answer.completion is not None else answer.error
    response = JSONResponse(payload, answer.status, answer.headers)
    if answer.dropped:
        # the headers promise the whole body; the connection closes halfway through it
        return StreamingResponse(
            _cut(response.body), answer.status, response.headers, "application/json"
        )
    return response


async def _server_sent(events: AsyncIterator[dict[str, Any] | str]) -> AsyncIterator[bytes]:
    """Each event as OpenAI frames it: one ``data:`` line of compact JSON, and a blank line."""
    async for event in events:
        data = (
            event
            if isinstance(event, str)
            else json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        )
        yield f"data: {data}\n\n".encode()


async def _cut(body: bytes) -> AsyncIterator[bytes]:
    yield body[: len(body) // 2]
    # the ASGI server closes a connection whose app fails after the response started
    raise DroppedConnection("a scripted break")


def _error(status: int, message: str, type: str | None = None, code: str | None = None) -> Response:
    return JSONResponse(error_body(status, message, type, code), status)


async def _http_error(request: Request, exc: Any) -> Response:
    """Routing errors (unknown path, wrong method) in OpenAI's error shape."""
    status = int(getattr(exc, "status_code", 500))
    what = f"{request.method} {request.url.path}"
    if status == 404:
        return _error(404, f"Unknown request URL: {what}.", "invalid_request_error", "unknown_url")
    if status == 405:
        return _error(405, f"Method not allowed: {what}.", "invalid_request_error")
    return _error(status, str(getattr(exc, "detail", "")) or f"Error {status}")
