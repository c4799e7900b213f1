"""`make bench`: Keel beside a hand-written Temporal loop, Temporal's OpenAI Agents integration,
Pydantic AI on Temporal, LangGraph with its SQLite checkpointer and a plain in-process loop,
all in one invocation, against one fake OpenAI-compatible endpoint and one in-memory
Temporal dev server (with `keel.dev.dev_server_args`).

    python -m bench.compare            # the full run (~25 min); the report goes to docs/benchmarks.md
    python -m bench.compare --quick    # a smoke run (~2 min); the report goes to bench/results/quick.md
    python -m bench.compare --only keel keel_api keel_stored plain   # Keel's own overhead

With Keel among the systems, it also measures Keel's streamed replies (`bench.streaming`)
its HTTP API (`bench.api`, `keel serve`) and a tool call's overhead as a tool of an MCP server
(`bench.mcp`), each on a model endpoint and workers of their own; their reports go between
their own markers.

Every measurement is interleaved round by round (the order rotates), and reported as medians
and as ratios measured side by side. See docs/benchmarks.md for what is measured, and how.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.api import BEGIN as API_BEGIN
from bench.api import END as API_END
from bench.api import ApiResults
from bench.api import Scale as ApiScale
from bench.api import measure as measure_api
from bench.api_report import render as render_api
from bench.burst import BEGIN as BURST_BEGIN
from bench.burst import END as BURST_END
from bench.burst import BurstResults
from bench.burst import Scale as BurstScale
from bench.burst import measure as measure_burst
from bench.burst import render as render_burst
from bench.drivers import SPECS, Env, KeelSystem, Spec, System, TemporalSystem, make, unavailable
from bench.harness import REPO, Arrivals, start_dev_server, start_fake_model, temporal_binary
from bench.mcp import BEGIN as MCP_BEGIN
from bench.mcp import END as MCP_END
from bench.mcp import RAW as MCP_RAW
from bench.mcp import MCPResults
from bench.mcp import measure as measure_mcp
from bench.mcp import render as render_mcp
from bench.measure import (
    MODEL_ACTIVITIES,
    History,
    Meter,
    approvals,
    fetch_history,
    history,
    latency,
    park,
    recovery,
    throughput,
)
from bench.procstat import load as load_average
from bench.report import Results, load, render, save
from bench.streaming import BEGIN as STREAMING_BEGIN
from bench.streaming import END as STREAMING_END
from bench.streaming import Scale as StreamingScale
from bench.streaming import StreamingResults
from bench.streaming import measure as measure_streaming
from bench.streaming_report import render as render_streaming
from keel.config import DEFAULT_PAYLOAD_THRESHOLD

DOC = REPO / "docs" / "benchmarks.md"
QUICK_OUT = REPO / "bench" / "results" / "quick.md"
FULL_JSON = REPO / "bench" / "results" / "compare.json"  # the raw results of the last full run
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PEERS = (
    "temporalio",
    "temporalio-openai-agents",
    "openai-agents",
    "pydantic-ai-slim",
    "langgraph",
    "langgraph-checkpoint-sqlite",
    "openai",
    "pydantic",
)


@dataclasses.dataclass(frozen=True)
class Scale:
    warmup: int
    latency_ks: tuple[int, ...]
    latency_rounds: tuple[int, ...]
    throughput_k: int
    throughput: tuple[tuple[int, int], ...]  # (runs at once, rounds)
    history_k: int
    history_points: tuple[int, ...]
    payload_threshold: int  # payload storage's threshold in the history runs
    keel_small_threshold: int  # and Keel's again at this one (0: not)
    parked: int
    approvals: int
    recovery_runs: int
    recovery_k: int
    recovery_delay_ms: int
    recovery_systems: tuple[str, ...] | None  # None: every system that can recover
    streaming_rounds: int  # of Keel's streamed replies against streaming off (bench.streaming)
    api: ApiScale  # keel serve against AgentClient (bench.api)
    mcp_rounds: int = 30  # a tool as an MCP server's against the same as a @tool (bench.mcp)
    burst: BurstScale = BurstScale()  # messages to one idle run (bench.burst)

    def describe(self) -> str:
        lat = ", ".join(
            f"K={k} × {n} rounds" for k, n in zip(self.latency_ks, self.latency_rounds, strict=True)
        )
        tp = ", ".join(f"{n} at once × {r} rounds" for n, r in self.throughput)
        return (
            f"latency {lat}; throughput (K={self.throughput_k}) {tp}; history K={self.history_k} "
            f"(payload threshold {self.payload_threshold:,} bytes); "
            f"{self.parked:,} parked runs; {self.approvals} approval samples per path; "
            f"recovery {self.recovery_runs} runs of K={self.recovery_k} "
            f"(model replies delayed {self.recovery_delay_ms} ms); {self.warmup} warm-up runs; "
            f"streamed replies {self.streaming_rounds} rounds; keel serve {self.api.rounds} "
            f"rounds, {self.api.watchers} SSE clients on a run, {self.api.runs} runs watched; "
            f"MCP tools {self.mcp_rounds} rounds; "
            f"a burst of {self.burst.messages} messages from {self.burst.concurrency} senders "
            f"× {self.burst.rounds} rounds"
        )


FULL = Scale(
    warmup=3,
    latency_ks=(5, 20),
    latency_rounds=(15, 10),
    throughput_k=5,
    throughput=((20, 5), (200, 2)),  # 200 at once: 2 rounds (each takes minutes here)
    history_k=300,
    history_points=(10, 100, 300),
    payload_threshold=DEFAULT_PAYLOAD_THRESHOLD,
    keel_small_threshold=512,
    parked=1000,
    approvals=20,
    recovery_runs=20,
    recovery_k=20,
    recovery_delay_ms=200,
    recovery_systems=None,
    streaming_rounds=15,
    api=ApiScale(),
)
QUICK = Scale(
    warmup=1,
    latency_ks=(5, 20),
    latency_rounds=(2, 2),
    throughput_k=5,
    throughput=((4, 1), (12, 1)),
    history_k=20,
    history_points=(5, 10, 20),
    payload_threshold=1024,  # a short conversation's transcript passes it
    keel_small_threshold=0,
    parked=20,
    approvals=2,
    recovery_runs=3,
    recovery_k=8,
    recovery_delay_ms=200,
    # the other systems wait out a 60 s activity timeout
    recovery_systems=("keel", "langgraph", "langgraph_sync"),
    streaming_rounds=2,
    api=ApiScale(rounds=2, approvals=2, watchers=10, runs=10),
    mcp_rounds=3,
    burst=BurstScale(rounds=1, messages=60, concurrency=30),
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def versions() -> str:
    parts = []
    for name in PEERS:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    try:
        out = subprocess.run(
            [temporal_binary(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        parts.append("temporal CLI " + out.removeprefix("temporal version "))
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(parts)


def keel_revision() -> str:
    """The commit measured, and whether Keel's own code had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "keel", "workflows", "activities", "client"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line for line in dirty if line.strip()]
    return head + (f" with {len(changed)} uncommitted file(s) in Keel's code" if changed else "")


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; load average at start "
        f"{load_average()} (other work shares the machine)"
    )


def median_history(hs: list[History]) -> History:
    """Field by field, the median of several runs' histories."""

    def m(f: Callable[[History], float]) -> Any:
        return statistics.median(f(h) for h in hs)

    return History(
        runs=m(lambda h: h.runs),
        events=int(m(lambda h: h.events)),
        total_bytes=int(m(lambda h: h.total_bytes)),
        step_bytes=[],
        wft=int(m(lambda h: h.wft)),
        wft_wait=m(lambda h: h.wft_wait),
        wft_run=m(lambda h: h.wft_run),
        activity=m(lambda h: h.activity),
        activities=int(m(lambda h: h.activities)),
        span=m(lambda h: h.span),
        stored=None if any(h.stored is None for h in hs) else int(m(lambda h: h.stored or 0)),
    )


async def section(r: Results, name: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run one measurement; a failure is reported, and the others still run."""
    t0 = time.monotonic()
    log(f"{name} ...")
    try:
        await work()
    except Exception as e:
        import traceback

        traceback.print_exc()
        r.errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    log(f"{name}: {time.monotonic() - t0:.0f} s")


async def amain(args: argparse.Namespace) -> Results:
    scale = QUICK if args.quick else FULL
    t_start = time.monotonic()
    r = Results(
        meta={
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python -m bench.compare", *sys.argv[1:]]),
            "machine": machine(),
            "versions": versions(),
            "keel": keel_revision(),
            "scale": scale.describe(),
        },
        scale={"throughput_k": scale.throughput_k, "payload_threshold": scale.payload_threshold},
        history_points=scale.history_points,
    )
    wanted = [s for s in SPECS if not args.only or s.key in args.only]
    for spec in wanted:
        why = unavailable(spec)
        if why:
            r.unavailable[spec.key] = why
            log(f"{spec.label}: {why}")
    workdir = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    log(f"working directory (logs, state): {workdir}")
    arrivals = Arrivals()
    dev, address = await start_dev_server(workdir)
    fake, url = await start_fake_model(workdir, arrivals)
    env = Env(address, url, workdir)
    systems: list[System] = []
    extra: list[System] = []
    try:

        async def start(spec: Spec) -> System | None:
            s = make(spec, env)
            try:
                await s.start()
                return s
            except Exception as e:
                r.unavailable[spec.key] = f"its worker did not start: {e}"
                log(f"{spec.label}: {e}")
                await s.stop()
                return None

        ready = [s for s in wanted if s.key not in r.unavailable]
        started = await asyncio.gather(*(start(spec) for spec in ready))
        systems = [s for s in started if s is not None]
        log("serving: " + ", ".join(s.label for s in systems))
        meter = Meter(dev.pid, fake.pid)
        # Keel's variants are measured for its own overhead: latency and its breakdown only
        peers = [s for s in systems if not s.spec.variant]
        by_key = {s.key: s for s in peers}
        temporal = [s for s in systems if isinstance(s, TemporalSystem)]

        async def warm() -> None:
            for s in systems:
                for _ in range(scale.warmup):
                    await s.run(5)

        await section(r, "warm-up", warm)

        for k, rounds in zip(scale.latency_ks, scale.latency_rounds, strict=True):

            async def lat(k: int = k, rounds: int = rounds) -> None:
                for s in systems:
                    s.run_ids.clear()
                r.latency[k] = await latency(systems, k, rounds, meter)

            await section(r, f"latency K={k}", lat)

        async def breakdown() -> None:
            for s in temporal:
                ids = s.run_ids[-5:]
                hs = [await fetch_history(s.client, i, MODEL_ACTIVITIES[s.key]) for i in ids]
                r.breakdown[s.key] = median_history(hs)

        await section(r, "where the time goes", breakdown)

        for n, rounds in scale.throughput:

            async def tp(n: int = n, rounds: int = rounds) -> None:
                r.throughput[n] = await throughput(peers, n, scale.throughput_k, rounds, meter)

            await section(r, f"throughput {n} at once", tp)

        async def approval() -> None:
            keel, loop = by_key.get("keel"), by_key.get("temporal_loop")
            if isinstance(keel, KeelSystem) and isinstance(loop, TemporalSystem):
                r.approvals = await approvals(keel, loop, arrivals, scale.approvals)

        await section(r, "approval to resume", approval)

        async def streamed() -> None:
            if "keel" in by_key:
                meta = {k: r.meta[k] for k in ("date", "command")}
                scale_ = StreamingScale(rounds=scale.streaming_rounds)
                results = await measure_streaming(address, dev.pid, workdir, scale_, meta)
                r.streaming = dataclasses.asdict(results)

        await section(r, "streamed replies", streamed)

        async def served() -> None:
            if "keel" in by_key:
                meta = {k: r.meta[k] for k in ("date", "command")}
                results = await measure_api(address, workdir, scale.api, meta, log)
                r.api = dataclasses.asdict(results)

        await section(r, "keel serve", served)

        async def mcp_tools() -> None:
            if "keel" in by_key:
                meta = {k: r.meta[k] for k in ("date", "command")}
                results = await measure_mcp(address, meta, scale.mcp_rounds)
                MCP_RAW.write_text(json.dumps(dataclasses.asdict(results), indent=1))
                _REPORTS.append((render_mcp(results), MCP_BEGIN, MCP_END))

        await section(r, "MCP tools", mcp_tools)

        async def burst() -> None:
            if "keel" in by_key:
                meta = {k: r.meta[k] for k in ("date", "command", "machine")}
                results = await measure_burst(address, workdir, scale.burst, meta)
                r.burst = dataclasses.asdict(results)

        await section(r, "a burst of messages", burst)

        async def hist() -> None:
            payloads = str(workdir / "payloads")
            runs = [(s, f"{s.key}", scale.payload_threshold) for s in temporal if s in peers]
            if scale.keel_small_threshold and "keel" in by_key:
                t = scale.keel_small_threshold
                runs.append((by_key["keel"], f"keel|threshold {t:,} bytes", t))
            for s, name, threshold in runs:
                stored = make(s.spec, env, payload_dir=payloads, payload_threshold=threshold)
                extra.append(stored)
                await stored.start()
                assert isinstance(stored, TemporalSystem)
                r.history[name] = await history(stored, scale.history_k)
                await stored.stop()
            keel = by_key.get("keel")
            if isinstance(keel, TemporalSystem):
                r.history["keel|payload storage off"] = await history(keel, scale.history_k)

        await section(r, f"history K={scale.history_k}", hist)

        async def parked() -> None:
            for key in ("keel", "temporal_loop"):
                if key not in by_key:
                    continue
                fresh = make(by_key[key].spec, env)  # its own worker: memory from a clean start
                extra.append(fresh)
                await fresh.start()
                assert isinstance(fresh, TemporalSystem)
                for _ in range(3):
                    await fresh.run(5)
                r.parked[key] = await park(fresh, scale.parked)
                await fresh.stop()

        await section(r, f"{scale.parked} parked runs", parked)

        for s in peers:
            if s.key == "plain":
                continue
            if scale.recovery_systems is not None and s.key not in scale.recovery_systems:
                continue

            async def rec(s: System = s) -> None:
                r.recovery[s.key] = await recovery(
                    s, arrivals, scale.recovery_runs, scale.recovery_k, scale.recovery_delay_ms
                )

            await section(r, f"recovery: {s.label}", rec)
    finally:
        for s in systems + extra:
            with contextlib.suppress(Exception):
                await s.stop()
        await fake.stop()
        await dev.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - t_start
    r.meta["wall"] = f"{wall / 60:.1f} min"
    return r


# reports of sections measured in `amain` that `Results` does not carry: (text, markers)
_REPORTS: list[tuple[str, str, str]] = []


def write(text: str, out: Path, begin: str = BEGIN, end: str = END) -> None:
    """Into `out` between the markers when it has them (the prose around stays); else the
    main report is the whole file, and another block (between its own markers) is appended."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        new = pattern.sub(lambda _: block, old, count=1)
    elif begin == BEGIN:
        new = text
    else:
        new = old + ("\n" if old else "") + block + "\n"
    out.write_text(new, encoding="utf-8")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds, smaller loads")
    p.add_argument(
        "--out",
        type=Path,
        help="report file (default: docs/benchmarks.md; quick: bench/results/quick.md)",
    )
    p.add_argument("--only", nargs="+", choices=[s.key for s in SPECS], help="these systems only")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: render the raw results a run saved (its .json) again",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = args.out or (QUICK_OUT if args.quick else DOC)
    raw = QUICK_OUT.with_suffix(".json") if args.quick else FULL_JSON
    code = 0
    try:
        if args.render:
            results = load(args.render)
        else:
            results = asyncio.run(amain(args))
            save(results, raw)
            log(f"raw results in {raw}")
        text = render(results)
        print(text, flush=True)
        write(text, out)
        if results.streaming:
            streaming = render_streaming(StreamingResults.of(results.streaming))
            print(streaming, flush=True)
            write(streaming, out, STREAMING_BEGIN, STREAMING_END)
        if results.api:
            api = render_api(ApiResults.of(results.api))
            print(api, flush=True)
            write(api, out, API_BEGIN, API_END)
        if args.render and MCP_RAW.exists():
            # rendered again: the MCP section's raw results are kept in a file of their own
            _REPORTS.append(
                (render_mcp(MCPResults.of(json.loads(MCP_RAW.read_text()))), MCP_BEGIN, MCP_END)
            )
        for text_, begin, end in _REPORTS:  # sections whose raw results are kept apart
            print(text_, flush=True)
            write(text_, out, begin, end)
        if results.burst:
            burst = render_burst(BurstResults.of(results.burst))
            print(burst, flush=True)
            write(burst, out, BURST_BEGIN, BURST_END)
        log(f"wrote {out}")
        if results.errors:
            code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the temporalio native runtime can abort in interpreter exit hooks


if __name__ == "__main__":
    main()
