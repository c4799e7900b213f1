"""Keel's HTTP API (`keel serve`), measured against `AgentClient`, in interleaved rounds.

1. What the API adds to a call: the same operation through HTTP (httpx against `keel serve`
   in a process of its own, on loopback, a bearer token) and through `AgentClient` directly,
   side by side: a run's status, the list of runs, a message, a decision (approve).
2. Approval to resume with `AgentClient.decide` (the `keel.decide_approval` update first):
   the decision sent → the run's next model request, against a bare signal round trip
   (`bench.measure.approvals`' own code).
3. Server-Sent Events: many clients following one run while it streams a reply, and many
   runs each followed by one client, on one `keel serve`: every event to every client, the
   delay from an event's time to its receipt, `keel serve`'s CPU and memory, and the run's
   history beside the same run followed by one client.

    python -m bench.api [--rounds N]   # Keel's .venv only; the report goes into
                                       # docs/benchmarks.md ("keel serve")

`python -m bench.compare` runs the same measurement as one of its sections.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.conversation import story_prompt
from bench.drivers import RUN_TIMEOUT, SPECS, Env, KeelSystem, TemporalSystem, make
from bench.harness import (
    REPO,
    Arrivals,
    Proc,
    free_port,
    run_standalone,
    start_dev_server,
    start_fake_model,
)
from bench.measure import approval_round, parked_keel, rotated, until
from bench.procstat import cpu_seconds, rss_bytes
from bench.streaming import POLL_UPDATE
from bench.systems.keel_agents import AGENT
from keel.client.api import AgentClient
from keel.gateway.auth import new_token, token_entry
from keel.workflows.models import SIGNAL_STREAM, DecideInput, Decision, MessagePolicy

DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "bench" / "results" / "api.json"
BEGIN, END = "<!-- bench:api:begin -->", "<!-- bench:api:end -->"
USER = "bench"
OPS = ("me", "status", "list", "message", "decide")  # "me": HTTP and its auth alone
RESUME = ("keel_update", "loop_signal", "bare_signal")


@dataclass(frozen=True)
class Scale:
    rounds: int = 15
    warmup: int = 1
    calls: int = 5  # status, list and message calls per round and path
    approvals: int = 20  # approval-to-resume samples per path
    watchers: int = 200  # SSE clients on one run
    runs: int = 200  # runs watched at once, one SSE client each
    pieces: int = 20  # the watched reply: this many pieces ...
    over_ms: int = 2000  # ... written over this time ...
    delay_ms: int = 2000  # ... after this long (every client is connected by then)


@dataclass
class Watch:
    """One SSE measurement: `clients` clients over `runs` runs."""

    clients: int
    runs: int
    complete: int  # clients that received every event of their run, in order, once
    events: int  # events per run (the stream's length, all runs alike)
    received: int  # events received, over all clients
    delays: list[float]  # event's time → receipt, for events after the client connected
    serve_cpu: float  # keel serve's CPU seconds over the measurement
    serve_rss_before: int
    serve_rss_peak: int
    seconds: float
    history: int  # events in a watched run's history (the median run's)
    polls: int  # watchers' poll updates in it
    signals: int  # keel.model_stream signals in it
    errors: int = 0  # `error` events the clients received instead of the rest of the run's
    error: str = ""  # the first of them


@dataclass
class ApiResults:
    meta: dict[str, str]
    scale: dict[str, int]
    calls: dict[str, list[float]] = field(default_factory=dict)  # "status_http", ...
    resume: dict[str, list[float]] = field(default_factory=dict)  # keel_update, bare_signal
    watch: dict[str, Watch] = field(default_factory=dict)  # "one", "fan_out", "many_runs"

    @classmethod
    def of(cls, d: dict[str, Any]) -> ApiResults:
        return cls(
            meta=d["meta"],
            scale=d["scale"],
            calls=d["calls"],
            resume=d["resume"],
            watch={k: Watch(**v) for k, v in d["watch"].items()},
        )


class Serve:
    """`keel serve` in a process of its own, for the keel system's runs, one user's token."""

    def __init__(self, address: str, keel: KeelSystem, workdir: Path) -> None:
        self.token = new_token()
        tokens = workdir / "api-tokens.toml"
        tokens.write_text(token_entry(USER, "bench", self.token), encoding="utf-8")
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            TEMPORAL_ADDRESS=address,
            KEEL_TASK_QUEUE=keel.task_queue,
            KEEL_API_TOKENS=str(tokens),
            KEEL_API_PORT=str(self.port),
            KEEL_API_RATE="0",
        )
        env.pop("KEEL_POLICY", None)
        argv = [sys.executable, "-c", "from keel.client.cli import main; main()", "serve"]
        self.proc = Proc("keel serve", argv, workdir / "logs" / "keel-serve.log", env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(60, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def start(self) -> None:
        await self.proc.start(wait_ready=False)
        async with self.client() as c:

            async def up() -> bool:
                try:
                    return (await c.get("/api/me")).status_code == 200
                except httpx.TransportError:
                    return False

            await until(up, 60, "keel serve to answer")


def ok(r: httpx.Response) -> Any:
    if r.status_code >= 300:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")
    return r.json()


async def timed(work: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await work()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- per call


async def call_round(
    keel: KeelSystem,
    agents: AgentClient,
    http: httpx.AsyncClient,
    arrivals: Arrivals,
    scale: Scale,
    r: int,
    out: dict[str, list[float]],
) -> None:
    """Each operation through both paths, the order rotating: status, list and message on a
    run waiting for an approval (cancelled after), a decision each on two such runs."""
    (held, _), (h_run, h_call), (d_run, d_call) = await asyncio.gather(
        *(parked_keel(keel, arrivals, f"call-{r}-{i}-{os.urandom(3).hex()}") for i in range(3))
    )
    run = held.run_id
    n = 0

    def message() -> str:
        nonlocal n
        n += 1
        return f"note {n}"

    direct: dict[str, Callable[[], Awaitable[Any]]] = {
        "me": lambda: asyncio.sleep(0),  # nothing: what the API costs with no call to Temporal
        "status": lambda: agents.status(run),
        "list": lambda: agents.list(limit=50),
        "message": lambda: agents.send_message(run, message(), MessagePolicy.QUEUE, sender=USER),
        "decide": lambda: agents.decide(
            d_run.run_id, DecideInput(call_id=d_call, decision=Decision.APPROVE, approver=USER)
        ),
    }
    via: dict[str, Callable[[], Awaitable[Any]]] = {
        "me": lambda: http.get("/api/me"),
        "status": lambda: http.get(f"/api/runs/{run}"),
        "list": lambda: http.get("/api/runs", params={"limit": 50}),
        "message": lambda: http.post(
            f"/api/runs/{run}/messages", json={"text": message(), "policy": "queue"}
        ),
        "decide": lambda: http.post(
            f"/api/runs/{h_run.run_id}/approvals/{h_call}", json={"decision": "approve"}
        ),
    }
    for op in rotated(OPS, r):
        for i in range(1 if op == "decide" else scale.calls):
            for path in rotated(("http", "direct"), r + i):
                if path == "http":
                    t0 = time.perf_counter()
                    ok(await via[op]())
                    out.setdefault(f"{op}_http", []).append(time.perf_counter() - t0)
                else:
                    out.setdefault(f"{op}_direct", []).append(await timed(direct[op]))
    await agents.cancel(run)
    await asyncio.gather(keel.finish(h_run), keel.finish(d_run))


# --------------------------------------------------------------------------- SSE


async def follow(
    http: httpx.AsyncClient,
    run: str,
    got: list[tuple[int, float, float]],
    connected: list[float],
    errors: list[str],
) -> bool:
    """One SSE client: each event's offset, its time and when it came, until the run ends
    (True) or the stream does without its end (False; an `error` event is kept)."""
    async with http.stream("GET", f"/api/runs/{run}/events") as r:
        if r.status_code != 200:
            errors.append(f"{r.status_code} {(await r.aread()).decode(errors='replace')}")
            return False
        connected.append(time.time())
        frame: dict[str, str] = {}
        async for line in r.aiter_lines():
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    frame[name] = value.removeprefix(" ")
                continue
            if frame.get("event") == "error":
                errors.append(frame.get("data", ""))
            elif "data" in frame:
                now = time.time()
                at = json.loads(frame["data"])["at"]
                got.append((int(frame["id"]), now, _epoch(at)))
                if frame.get("event") == "ended":
                    return True
            frame = {}
    return False


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def history_of(keel: KeelSystem, run: str) -> tuple[int, int, int]:
    events = polls = signals = 0
    h = await keel.client.get_workflow_handle(run).fetch_history()
    for e in h.events:
        events += 1
        if e.HasField("workflow_execution_signaled_event_attributes"):
            signals += e.workflow_execution_signaled_event_attributes.signal_name == SIGNAL_STREAM
        elif e.HasField("workflow_execution_update_accepted_event_attributes"):
            accepted = e.workflow_execution_update_accepted_event_attributes
            polls += accepted.accepted_request.input.name == POLL_UPDATE
    return events, polls, signals


async def watch(
    keel: KeelSystem,
    serve: Serve,
    http: httpx.AsyncClient,
    runs: int,
    per_run: int,
    scale: Scale,
) -> Watch:
    """`runs` runs streaming a reply at once, each followed by `per_run` SSE clients from
    just after its start (a reply begins `delay_ms` later)."""
    rss0, cpu0, t0 = rss_bytes(serve.proc.pid), cpu_seconds(serve.proc.pid), time.monotonic()
    peak = rss0
    ids: list[str] = [""] * runs
    got: list[list[list[tuple[int, float, float]]]] = [
        [[] for _ in range(per_run)] for _ in range(runs)
    ]
    conn: list[list[list[float]]] = [[[] for _ in range(per_run)] for _ in range(runs)]
    errors: list[str] = []
    tasks: dict[tuple[int, int], asyncio.Task[bool]] = {}
    starting = asyncio.Semaphore(20)

    async def begin(i: int) -> None:
        async with starting:
            ids[i] = await keel.agents.start(
                AGENT,
                story_prompt(
                    scale.pieces, f"w{os.urandom(4).hex()}", scale.delay_ms, scale.over_ms
                ),
                user=USER,
                run_id=keel.new_id(0),
                execution_timeout=RUN_TIMEOUT,
            )
        for j in range(per_run):
            tasks[i, j] = asyncio.create_task(follow(http, ids[i], got[i][j], conn[i][j], errors))

    await asyncio.gather(*(begin(i) for i in range(runs)))
    while not all(t.done() for t in tasks.values()):
        peak = max(peak, rss_bytes(serve.proc.pid))
        await asyncio.wait(tasks.values(), timeout=0.2)
    seconds = time.monotonic() - t0
    cpu = cpu_seconds(serve.proc.pid) - cpu0
    await asyncio.gather(*(keel.agents.result(run) for run in ids))
    lengths, delays, complete, received = [], [], 0, 0
    for i in range(len(ids)):
        length = max((o for c in got[i] for o, _, _ in c), default=-1) + 1
        lengths.append(length)
        for j, (c, connected) in enumerate(zip(got[i], conn[i], strict=True)):
            received += len(c)
            ended = tasks[i, j].result()  # an exception in a client is the measurement's
            complete += ended and [o for o, _, _ in c] == list(range(length))
            delays += [now - at for _, now, at in c if connected and at >= connected[0]]
    hist = sorted([await history_of(keel, run) for run in ids])[len(ids) // 2]
    return Watch(
        per_run * runs,
        runs,
        complete,
        int(sorted(lengths)[len(lengths) // 2]),
        received,
        delays,
        cpu,
        rss0,
        peak,
        seconds,
        *hist,
        errors=len(errors),
        error=errors[0] if errors else "",
    )


# --------------------------------------------------------------------------- all of it


async def measure(
    address: str,
    workdir: Path,
    scale: Scale,
    meta: dict[str, str],
    log: Callable[[str], None] = print,
) -> ApiResults:
    """On a fake endpoint, a Keel worker, a hand-written loop's worker (for the bare signal)
    and a `keel serve` of their own (the dev server is the caller's)."""
    arrivals = Arrivals()
    fake, url = await start_fake_model(
        workdir, arrivals, "--forget-every", "0", name="fakemodel-api"
    )
    env = Env(address, url, workdir)
    keel = make(next(s for s in SPECS if s.key == "keel"), env)
    loop = make(next(s for s in SPECS if s.key == "temporal_loop"), env)
    assert isinstance(keel, KeelSystem) and isinstance(loop, TemporalSystem)
    out = ApiResults(meta, dataclasses.asdict(scale))
    serve: Serve | None = None
    try:
        await asyncio.gather(keel.start(), loop.start())
        serve = Serve(address, keel, workdir)
        await serve.start()
        agents = AgentClient(keel.client, keel.settings(), as_user=USER)
        async with serve.client() as http:
            log("api: per call")
            for r in range(scale.warmup):
                await call_round(keel, agents, http, arrivals, scale, r, {})
            for r in range(scale.rounds):
                await call_round(keel, agents, http, arrivals, scale, r, out.calls)
            log("api: approval to resume")
            for i in range(scale.approvals):
                for v in rotated(RESUME, i):
                    tag = f"api-{v}-{i}-{os.urandom(3).hex()}"
                    to_model, _ = await approval_round(v, keel, loop, arrivals, tag)
                    out.resume.setdefault(v, []).append(to_model)
            log("api: one run, one SSE client")
            out.watch["one"] = await watch(keel, serve, http, 1, 1, scale)
            log(f"api: one run, {scale.watchers} SSE clients")
            out.watch["fan_out"] = await watch(keel, serve, http, 1, scale.watchers, scale)
            log(f"api: {scale.runs} runs, one SSE client each")
            out.watch["many_runs"] = await watch(keel, serve, http, scale.runs, 1, scale)
    finally:
        if serve is not None:
            await serve.proc.stop()
        await asyncio.gather(keel.stop(), loop.stop(), return_exceptions=True)
        await fake.stop()
    return out


async def amain(args: argparse.Namespace) -> ApiResults:
    from bench.compare import keel_revision, log, machine

    t0 = time.monotonic()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.api", *sys.argv[1:]]),
        "machine": machine(),
        "keel": keel_revision(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="keel-bench-api-"))
    log(f"working directory (logs): {workdir}")
    dev, address = await start_dev_server(workdir)
    try:
        scale = Scale(
            rounds=args.rounds,
            warmup=args.warmup,
            approvals=args.approvals,
            watchers=args.watchers,
            runs=args.runs,
        )
        results = await measure(address, workdir, scale, meta, log)
    finally:
        await dev.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results.meta["wall"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    return results


def main(argv: list[str] | None = None) -> None:
    from bench.api_report import render

    p = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=Scale.rounds, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=Scale.warmup, help="unrecorded rounds first")
    p.add_argument("--approvals", type=int, default=Scale.approvals, help="samples per path")
    p.add_argument("--watchers", type=int, default=Scale.watchers, help="SSE clients, one run")
    p.add_argument("--runs", type=int, default=Scale.runs, help="runs watched at once")
    p.add_argument("--out", type=Path, default=DOC, help="report file (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: render a saved run"
    )
    run_standalone(p.parse_args(argv), amain, ApiResults.of, render, RAW, (BEGIN, END))


if __name__ == "__main__":
    main()
