"""The HTTP API and its page (`keel serve`): `create_app(settings)` is the ASGI app.

/api/...       JSON and Server-Sent Events, as the caller (a bearer token or the
               sign-in cookie); OpenAPI at /openapi.json, its docs at /docs
/, /static/    the page, shipped as static files in the package
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from temporalio.client import Client

from keel.config import Settings, SettingsError, connect
from keel.gateway import approvals, problems, runs, session
from keel.gateway.auth import TokenFile
from keel.gateway.context import Gateway
from keel.gateway.problems import Problem
from keel.policy_file import PolicyError
from keel.workflows.models import Policy

STATIC = Path(__file__).parent / "static"


def load_gateway_policy(settings: Settings) -> Policy | None:
    """The workers' policy (KEEL_POLICY), which gives each caller roles, tenant and
    visibility; None without one (then each caller sees their own runs)."""
    if not settings.policy_file:
        return None
    from keel.activities.registry import load_policy

    try:
        return load_policy(settings.policy_file)
    except PolicyError as e:
        raise SettingsError(f"KEEL_POLICY: {e}") from None


def create_app(settings: Settings, client: Client | None = None) -> FastAPI:
    """The gateway's app. Without `client`, it connects to Temporal from `settings` when it
    starts. SettingsError at once for a setting it cannot work with (no tokens file, a
    policy or tokens file that does not parse)."""
    if not settings.api_tokens:
        raise SettingsError(
            "keel serve needs KEEL_API_TOKENS: a file of token hashes "
            "(`keel token new --user NAME` prints a token and its entry)"
        )
    gw = Gateway(settings, load_gateway_policy(settings), TokenFile(settings.api_tokens), client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gw.client is None:
            try:
                gw.client = await connect(settings)
            except RuntimeError as e:
                raise SettingsError(
                    f"cannot reach Temporal at {settings.address} ({e}); is it running?"
                ) from e
        yield

    app = FastAPI(
        title="Keel",
        summary="Runs of AI agents on Temporal: start, follow, approve, message.",
        version="1",
        lifespan=lifespan,
    )
    app.state.gateway = gw
    problems.install(app)
    for router in (session.router, runs.router, approvals.router):
        app.include_router(router)
    if settings.api_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.api_cors_origins),
            allow_credentials=True,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["Retry-After"],
        )
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = STATIC / "index.html"
        if not index.is_file():
            raise Problem(404, "this installation has no page")
        return FileResponse(index)

    return app
