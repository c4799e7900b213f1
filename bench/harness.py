"""The benchmark's processes: the Temporal dev server, the fake endpoint, the workers.

Every system's worker (or, for the systems without a server, the process running its
loops) is a child process of its own, so its CPU time and memory can be read from /proc
apart from the harness, the dev server and the fake endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import die_with_parent
from keel.dev import dev_server_args, temporal_binary
from keel.workflows.models import SEARCH_ATTRIBUTES

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0


class ProcError(RuntimeError):
    """A child process failed to start or died; the message has the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_error(path: Path) -> str:
    """The last line of a log that says something (a traceback's exception line)."""
    lines = [x.strip() for x in tail(path, 40).splitlines() if x.strip()]
    return lines[-1] if lines else "(no output)"


class Proc:
    """A child process that prints `READY ...` once it serves, then lines the caller reads.

    Lines that are JSON objects with an `id` answer `request`s; any other line goes to
    `on_line`. stderr goes to a log file, whose end is quoted when the process fails."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.on_line = on_line
        self.ready_line = ""
        self.started_in = 0.0  # seconds from spawn to READY
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[str] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} is not running"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout: float = START_TIMEOUT, *, wait_ready: bool = True) -> None:
        """Spawn, then wait for its `READY` line (unless `wait_ready` is False)."""
        t0 = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as err:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=self.env,
                preexec_fn=die_with_parent,
                limit=2**24,
            )
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(self._proc, self._ready))
        if not wait_ready:
            self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        try:
            self.ready_line = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except (TimeoutError, ProcError) as e:
            await self.stop()
            raise ProcError(f"{self.name} did not start: {e}: {last_error(self.log)}") from None
        self.started_in = time.monotonic() - t0

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Future[str]) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\n")
            if not ready.done() and line.startswith("READY"):
                ready.set_result(line)
            elif line.startswith("{"):
                msg = json.loads(line)
                fut = self._pending.pop(msg.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif self.on_line is not None:
                self.on_line(line)
        await proc.wait()
        gone = ProcError(f"{self.name} exited with {proc.returncode}")
        if not ready.done():
            ready.set_exception(gone)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(gone)
        self._pending.clear()

    async def request(self, **msg: Any) -> dict[str, Any]:
        """Send one JSON command on stdin; its answer (same `id`) from stdout."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        proc.stdin.write((json.dumps({"id": self._next_id, **msg}) + "\n").encode())
        await proc.stdin.drain()
        return await fut

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the server, as when a machine dies."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 15.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        self._proc = None


async def start_dev_server(workdir: Path) -> tuple[Proc, str]:
    """The Temporal dev server, in memory, with Keel's settings and search attributes."""
    port = free_port()
    argv = [
        temporal_binary(),
        "server",
        "start-dev",
        "--headless",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--namespace",
        "default",
        "--log-level",
        "error",
        *dev_server_args(file_backed=False),
    ]
    for attr in SEARCH_ATTRIBUTES:
        argv += ["--search-attribute", f"{attr.name}={attr._metadata_type}"]
    proc = Proc("temporal dev server", argv, workdir / "logs" / "temporal.log")
    await proc.start(wait_ready=False)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, address
        if not proc.running or time.monotonic() > deadline:
            raise ProcError(f"the Temporal dev server did not start\n{tail(proc.log)}")
        await asyncio.sleep(0.1)


@dataclass
class Arrivals:
    """When each tagged run's model requests reached the fake endpoint (time.monotonic)."""

    seen: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_line(self, line: str) -> None:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "A":
            self.seen.setdefault(parts[2], []).append((float(parts[1]), int(parts[3])))
            self._changed.set()

    def count(self, tag: str) -> int:
        return len(self.seen.get(tag, []))

    def last_results(self, tag: str) -> int:
        """The most tool results any of this run's requests carried so far (-1: none)."""
        return max((n for _, n in self.seen.get(tag, [])), default=-1)

    def first(
        self,
        tag: str,
        *,
        after: float = 0.0,
        results: int | None = None,
        more_than: int | None = None,
    ) -> float | None:
        for t, n in self.seen.get(tag, []):
            if t <= after or (results is not None and n != results):
                continue
            if more_than is not None and n <= more_than:
                continue
            return t
        return None

    async def wait(
        self,
        tag: str,
        *,
        after: float = 0.0,
        results: int | None = None,
        more_than: int | None = None,
        timeout: float = 120.0,
    ) -> float:
        """The first arrival of `tag` after `after` (with `results` tool results, or more
        than `more_than`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.first(tag, after=after, results=results, more_than=more_than)
            if t is not None:
                return t
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no model request from run {tag} arrived in {timeout:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))


async def start_fake_model(
    workdir: Path, arrivals: Arrivals, *args: str, name: str = "fakemodel"
) -> tuple[Proc, str]:
    """The fake endpoint (`bench.fakemodel`, with these command-line `args`)."""
    proc = Proc(
        "fake model endpoint",
        [sys.executable, "-m", "bench.fakemodel", *args],
        workdir / "logs" / f"{name}.log",
        on_line=arrivals.on_line,
    )
    await proc.start()
    return proc, proc.ready_line.split()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: this one, with no provider configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "KEEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_standalone(
    args: argparse.Namespace,
    measure: Callable[[argparse.Namespace], Awaitable[Any]],
    load: Callable[[dict[str, Any]], Any],
    render: Callable[[Any], str],
    raw: Path,
    markers: tuple[str, str],
) -> None:
    """A measurement module run on its own: measure (or `--render` a saved run), keep the
    raw results in `raw`, write the report between its `markers` in `args.out`, and exit."""
    from bench.compare import log, write

    code = 0
    try:
        if args.render:
            results = load(json.loads(args.render.read_text(encoding="utf-8")))
        else:
            results = asyncio.run(measure(args))
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text(json.dumps(dataclasses.asdict(results), indent=1), encoding="utf-8")
            log(f"raw results in {raw}")
        text = render(results)
        print(text, flush=True)
        write(text, args.out, *markers)
        log(f"wrote {args.out}")
    except KeyboardInterrupt:
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the temporalio native runtime can abort in interpreter exit hooks
