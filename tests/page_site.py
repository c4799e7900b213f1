"""The page's tests' site: the real gateway app (keel.gateway.create_app) over a harness's
runs, served by uvicorn on a free local port in the test's own event loop."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from keel.config import Settings
from keel.gateway import create_app
from keel.gateway.auth import new_token, token_entry
from tests.conftest import Harness


@dataclass
class Site:
    url: str
    tokens: dict[str, str]  # user → their token


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve `app` on a free local port until the block ends; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    # a browser's streams still open must not hold up the server's shutdown
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # it could not start: say why
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def site(
    h: Harness, where: Path, users: list[str], policy: dict[str, Any]
) -> AsyncIterator[Site]:
    """The gateway over the harness's task queue with this policy (the workers' policy
    file's JSON), and a token in its tokens file for each of `users`."""
    tokens = {u: new_token() for u in users}
    (where / "tokens.toml").write_text("".join(token_entry(u, u, t) for u, t in tokens.items()))
    (where / "policy.json").write_text(json.dumps(policy))
    settings = Settings(
        task_queue=h.settings.task_queue,
        policy_file=str(where / "policy.json"),
        api_tokens=str(where / "tokens.toml"),
    )
    async with serve(create_app(settings, client=h.client)) as url:
        yield Site(url, tokens)
