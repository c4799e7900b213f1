"""``ScriptedModelServer``: the scripted model served by uvicorn on a thread of its own."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from .app import build_app
from .rules import RuleSet
from .script import DroppedConnection, ScriptedModel

# How long a stopping server waits for replies already on their way out.
STOP_GRACE_SECONDS = 5.0


class ServerBindError(OSError):
    """The server could not bind its address; the message names host and port."""


class PortInUseError(ServerBindError):
    """The port is already taken."""


class _QuietDrops(logging.Filter):
    """uvicorn logs an app that fails mid-answer as a crash; a scripted drop is no crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


_QUIET_DROPS = _QuietDrops()


def as_rules(rules: RuleSet | Mapping[str, Any] | str | Path | None) -> RuleSet:
    """Rules given as a RuleSet, a dict in the rules file's shape, or a rules file's path."""
    if rules is None:
        return RuleSet()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, Mapping):
        return RuleSet.from_dict(rules)
    return RuleSet.load(rules)


class ScriptedModelServer(ScriptedModel):
    """The scripted model over HTTP, on a background thread with its own event loop; port 0
    (the default) binds a free port. A context manager; ``base_url`` is what an OpenAI client
    (or ``ModelProvider``) takes.

    >>> with ScriptedModelServer("tests/rules.json") as model:
    ...     client = AsyncOpenAI(base_url=model.base_url, api_key="x", max_retries=0)
    """

    def __init__(
        self,
        rules: RuleSet | Mapping[str, Any] | str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
    ) -> None:
        super().__init__(as_rules(rules))
        self._host = host
        self._requested_port = port
        self.verbose = verbose
        self._socket: socket.socket | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> None:
        """Bind, then serve on a daemon thread; raises PortInUseError if the port is taken."""
        if self._thread is not None:
            raise RuntimeError("scripted model server already started")
        # bound here, so a taken port fails in the caller and port 0 is known at once;
        # connections made before the loop runs wait in the listen backlog
        self._socket = self._bind()
        config = uvicorn.Config(
            build_app(self),
            log_config=None,  # leave the host application's logging alone
            log_level="info" if self.verbose else "warning",
            access_log=self.verbose,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=STOP_GRACE_SECONDS,
        )
        self._uvicorn = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)  # added once, however often
        self._begin()
        self._thread = threading.Thread(
            target=self._serve,
            args=(self._uvicorn, self._socket),
            name=f"scripted-model-server:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._requested_port))
            sock.listen(256)
        except OSError as e:
            sock.close()
            where = f"{self._host}:{self._requested_port}"
            if e.errno == errno.EADDRINUSE:
                exc: ServerBindError = PortInUseError(
                    f"cannot start the scripted model server: port {self._requested_port} "
                    f"on {self._host} is already in use; choose another port"
                )
            else:
                exc = ServerBindError(
                    f"cannot start the scripted model server on {where}: {e.strerror or e}"
                )
            exc.errno = e.errno
            raise exc from e
        return sock

    @staticmethod
    def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
        asyncio.run(server.serve(sockets=[sock]))

    def stop(self) -> None:
        """Stop serving; replies still waiting (delays, gates, slow faults) answer 503, and
        streams already under way (paused at a gate or between chunks) are dropped."""
        server, thread, sock = self._uvicorn, self._thread, self._socket
        if server is None or thread is None:
            return
        self._end_waits()
        server.should_exit = True
        thread.join(timeout=STOP_GRACE_SECONDS + 5)
        if sock is not None:
            sock.close()
        self._uvicorn = self._thread = self._socket = None

    def __enter__(self) -> ScriptedModelServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- where it is

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the requested one."""
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return self._requested_port

    @property
    def root_url(self) -> str:
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"{self.root_url}/v1"

    url = base_url  # the name earlier callers use
