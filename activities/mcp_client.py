"""One MCP session per server per worker process, through the official `mcp` package.

The transports' context managers (`stdio_client`, `streamable_http_client`, `ClientSession`)
must be entered and left by one task, so a background task owns each server's session; calls
from any activity use it. A session that dies (the process exits, the HTTP server goes away)
is dropped, and the next call opens a new one. Every failure to reach a server is a
retryable `ApplicationError` (type `MCPServerUnavailable`): Temporal retries the activity,
perhaps on another worker, with the tool's backoff.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.stdio import get_default_environment
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import McpError
from mcp.types import CONNECTION_CLOSED, CallToolResult
from temporalio.exceptions import ApplicationError

MCP_UNAVAILABLE = "MCPServerUnavailable"  # retried: the server is down, or went away mid-call
CONNECT_SECONDS = 30.0  # starting a server and its `initialize` handshake
_LIVE: weakref.WeakSet[MCPConnections] = weakref.WeakSet()


def unavailable(server: str, why: object) -> ApplicationError:
    """The retryable error of a server that cannot be reached (or was lost mid-call)."""
    return ApplicationError(f"MCP server {server!r} is unavailable: {why}", type=MCP_UNAVAILABLE)


class _Link:
    """One server's session, owned by its own task from open to close."""

    def __init__(self, name: str, transport: Any) -> None:
        self.name = name
        self.session: ClientSession | None = None
        self.ready = asyncio.Event()
        self.gone = asyncio.Event()
        self.error: BaseException | None = None
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._own(transport), name=f"keel mcp {name}")

    async def _own(self, transport: Any) -> None:
        try:
            async with AsyncExitStack() as stack:
                streams = await stack.enter_async_context(transport)
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                self.session = session
                self.ready.set()
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - whatever ended it, the link is gone
            self.error = e
        finally:
            self.session = None
            self.gone.set()
            self.ready.set()

    async def close(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()


class MCPConnections:
    """The sessions of one worker process, one per server, opened on first use."""

    def __init__(self) -> None:
        self._links: dict[str, _Link] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        _LIVE.add(self)

    async def list_tools(self, server: Any) -> list[Any]:
        """Every tool the server lists (all pages)."""
        found: list[Any] = []
        cursor: str | None = None
        while True:
            page = await self._request(server, lambda s, c=cursor: s.list_tools(cursor=c))
            found.extend(page.tools)
            cursor = page.nextCursor
            if not cursor:
                return found

    async def call_tool(
        self, server: Any, tool: str, arguments: dict[str, Any], meta: dict[str, Any]
    ) -> CallToolResult:
        """Call a tool; `meta` goes in the request's `_meta` (the idempotency key)."""
        return await self._request(server, lambda s: s.call_tool(tool, arguments, meta=meta))

    async def _request(self, server: Any, send: Any) -> Any:
        link = await self._link(server)
        assert link.session is not None
        call = asyncio.ensure_future(send(link.session))
        lost = asyncio.ensure_future(link.gone.wait())
        try:
            await asyncio.wait({call, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not call.done():
                call.cancel()
        if not call.done() or call.cancelled():
            await self._drop(link)
            raise unavailable(server.name, f"the connection closed mid-call ({link.error!r})")
        try:
            return call.result()
        except McpError as e:
            if e.error.code != CONNECTION_CLOSED:
                raise  # the server's own answer: the caller gives it to the model
            await self._drop(link)
            raise unavailable(server.name, "the connection closed mid-call") from None
        except (
            OSError,
            httpx.HTTPError,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
        ) as e:
            await self._drop(link)
            raise unavailable(server.name, repr(e)) from None

    async def _link(self, server: Any) -> _Link:
        lock = self._locks.setdefault(server.name, asyncio.Lock())
        async with lock:
            link = self._links.get(server.name)
            if link is None or link.gone.is_set():
                link = self._links[server.name] = _Link(server.name, _transport(server))
            try:
                await asyncio.wait_for(link.ready.wait(), CONNECT_SECONDS)
            except TimeoutError:
                await self._drop(link)
                raise unavailable(
                    server.name, f"no session within {CONNECT_SECONDS:.0f}s"
                ) from None
            if link.session is None:
                await self._drop(link)
                raise unavailable(server.name, _reason(link.error))
            return link

    async def _drop(self, link: _Link) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        await link.close()

    async def close(self) -> None:
        """Close every session (the processes started for them exit)."""
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)


async def close_connections() -> None:
    """Close the MCP sessions of every toolset in this process (a worker shutting down)."""
    await asyncio.gather(*(c.close() for c in list(_LIVE)), return_exceptions=True)


def _reason(error: BaseException | None) -> str:
    """The innermost cause of a failed connection, readable (task groups nest them)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return repr(error) if error is not None else "the connection closed"


def _transport(server: Any) -> Any:
    """The transport's context manager; secrets are read now, so a missing one is said at
    once (MCPConfigError), not inside the background task."""
    if hasattr(server, "url"):
        return _http(server.url, server.resolved_headers())
    params = StdioServerParameters(
        command=server.command,
        args=list(server.args),
        env={**get_default_environment(), **server.resolved_env()},
        cwd=server.cwd,
    )
    return stdio_client(params)


@asynccontextmanager
async def _http(url: str, headers: dict[str, str]) -> AsyncIterator[tuple[Any, Any]]:
    async with (
        create_mcp_http_client(headers=headers) as client,
        streamable_http_client(url, http_client=client) as (read, write, _),
    ):
        yield read, write


def result_text(result: CallToolResult) -> str:
    """What the model reads of a result: its text parts joined (a server that returns
    structured content mirrors it there as JSON), else its structured content as JSON; other
    parts (images, audio, links) are named, not inlined."""
    parts = []
    for c in result.content:
        if c.type == "text":
            parts.append(c.text)
        elif c.type == "resource" and hasattr(c.resource, "text"):
            parts.append(c.resource.text)
        else:
            parts.append(f"[{c.type} content: {getattr(c, 'mimeType', '') or 'not shown'}]")
    if not parts and result.structuredContent is not None:
        return json.dumps(result.structuredContent, ensure_ascii=False)
    return "\n".join(parts)
