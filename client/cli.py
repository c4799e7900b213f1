"""The `keel` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio.service import RPCError

from keel.client.api import (
    QUERY_TIMEOUT,
    AgentClient,
    KeelClientError,
    NoWorker,
    load_approver_key,
    no_worker,
)
from keel.client.visibility import RUN_STATUSES, TERMINATED, TIMED_OUT
from keel.config import Settings, SettingsError, use_core_logging
from keel.workflows.budgets import usage_line
from keel.workflows.events import EventKind, RunEvent
from keel.workflows.models import TERMINAL_STATUSES, WORKFLOW_TYPE

TERMINAL_VALUES = {st.value for st in TERMINAL_STATUSES} | {TERMINATED, TIMED_OUT}
CLOSED_QUERY_TIMEOUT = timedelta(seconds=5)  # a finished run's record: else its summary
WORKER_PATIENCE = 5.0  # seconds a waiting command gives a worker that is starting too

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def _agents(settings: Settings) -> AgentClient:
    try:
        return await AgentClient.connect(settings)
    except RuntimeError as e:
        raise KeelClientError(
            f"cannot reach Temporal at {settings.address} ({e}); is `keel dev` running?"
        ) from e


async def cmd_dev(a: argparse.Namespace, s: Settings) -> int:
    from keel.dev import run_dev

    await run_dev(s)
    return 0


async def cmd_demo(a: argparse.Namespace, s: Settings) -> int:
    from keel.demo.run import run_demo

    return await run_demo(s, yes=a.yes)


async def cmd_worker(a: argparse.Namespace, s: Settings) -> int:
    from keel.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        await run_worker(
            s,
            agents=a.agents,
            resources=a.resources,
            workflows=a.workflows,
            activities=a.activities,
            role=a.role,
        )
    except RuntimeError as e:  # the SDK's "failed client connect" and the like
        raise KeelClientError(f"worker: {e} (TEMPORAL_ADDRESS is {s.address})") from e
    return 0


async def cmd_start(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    queue = a.task_queue or agents.task_queue
    run_id = await agents.start(
        a.agent, a.message, user=a.user, run_id=a.id, loop=a.loop, task_queue=queue
    )
    if not a.wait:
        print(run_id)
        return 0
    await _served(agents, run_id, queue)
    result = await agents.result(run_id)
    if result.final_answer:
        print(result.final_answer)
    if result.status.value not in ("completed", "idle"):
        print(f"run {run_id} ended {result.status.value}: {result.error}", file=sys.stderr)
        return 1
    return 0


async def _served(agents: AgentClient, run_id: str, queue: str) -> None:
    """Refuse to wait in silence for a run no worker serves: say which queue it waits on."""
    if await agents.worker_arrives(queue, WORKER_PATIENCE):
        return
    raise NoWorker(
        f"run {run_id} waits on task queue {queue!r}, where no worker is polling: start one "
        f"there (KEEL_TASK_QUEUE={queue} keel worker ...), or start runs on your worker's "
        f"queue (keel start --task-queue NAME). The run stays queued: `keel result {run_id}` "
        f"waits for its answer, `keel cancel {run_id}` drops it"
    )


async def cmd_status(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    summary = await agents.summary(a.run)
    closed = summary.temporal_status != "running"  # then a worker is nice to have, not needed
    try:
        if not await agents.worker_arrives(summary.task_queue):
            raise no_worker(a.run, summary.task_queue)  # no query that cannot be answered
        state = await agents.get_state(
            a.run, timeout=CLOSED_QUERY_TIMEOUT if closed else QUERY_TIMEOUT
        )
    except NoWorker as e:
        # what Temporal itself knows, which needs no worker; a running run's record is not
        # all there, and the exit status says so
        if a.json:
            _json(summary.model_dump())
        else:
            print(
                f"{a.run}: {summary.status} (Temporal: "
                f"{summary.temporal_status}), step {summary.steps}, {summary.tokens} tokens"
            )
            print(f"  task queue: {summary.task_queue}")
            if summary.error:
                print(f"  ended: {summary.error}")
        print(f"  {e}", file=sys.stderr)
        return 0 if closed else 1
    # a closed run's status is Temporal's: one terminated or timed out from outside Keel
    # replays to the last status it upserted itself
    status = summary.status if closed else state.status.value
    if a.json:
        _json(
            {
                **state.model_dump(mode="json"),
                "status": status,
                "temporal_status": summary.temporal_status,
                "task_queue": summary.task_queue,
            }
        )
        return 0
    print(f"{a.run}: {status}, step {state.step}, {state.usage.total_tokens} tokens")
    print(f"  usage: {usage_line(state.usage, state.subagents)}")
    print(f"  task queue: {summary.task_queue}")
    for pin in state.spec.mcp if state.spec else []:  # the tool lists this run pinned
        print(f"  MCP server {pin.server}: tools {pin.digest[:19] or 'not listed yet'}")
    if closed and summary.error and not state.error:
        print(f"  ended: {summary.error}")
    for r in state.pending_approvals:
        print(f"  waiting for approval: {r.call_id} {r.tool}({r.arguments}) — {r.reason}")
    for q in state.queued_messages:
        print(f"  queued message ({q.policy.value}): {q.text}")
    for e in state.effects:
        print(f"  effect: {e.tool}({e.arguments}) key={e.idempotency_key}")
    if state.final_answer:
        print(f"  answer: {state.final_answer}")
    if state.error:
        print(f"  error: {state.error}")
    return 0


async def cmd_result(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    summary = await agents.summary(a.run)
    if summary.temporal_status == "running":
        await _served(agents, a.run, summary.task_queue)
    result = await agents.result(a.run)
    if result.final_answer:
        print(result.final_answer)
    if result.error:
        print(f"{result.status.value}: {result.error}", file=sys.stderr)
    return 0 if result.status.value in ("completed", "idle") else 1


async def cmd_list(a: argparse.Namespace, s: Settings) -> int:
    runs = await (await _agents(s)).list(status=a.status, as_user=a.as_user)
    if a.json:
        _json([r.model_dump() for r in runs])
        return 0
    for r in runs:
        started = f"{r.started:%Y-%m-%d %H:%M:%S}" if r.started else ""
        print(
            f"{r.run_id:32} {r.agent:12} {r.status:17} steps={r.steps:<3} "
            f"tokens={r.tokens:<7} {r.user} {started}"
        )
    return 0


def event_line(run: str, offset: int, e: RunEvent) -> str:
    """One event as `keel watch` prints it."""
    head = f"{e.at:%H:%M:%S} #{offset:<4} step {e.step:<3}"
    k = e.kind
    if k == EventKind.STATUS:
        body = f"status {e.status}" + (f": {e.text}" if e.text else "")
    elif k == EventKind.MODEL_REPLY:
        said = f" {e.text!r}" if e.text else ""
        calls = f" → {e.detail}" if e.detail else ""
        body = f"model {e.model or ''} ({e.tokens} tokens){said}{calls}"
    elif k == EventKind.TOOL_STARTED:
        body = f"tool {e.tool}({e.arguments}) running  [{e.call_id}]"
    elif k == EventKind.TOOL_RESULT:
        body = f"tool {e.tool} → {e.text}"
    elif k == EventKind.APPROVAL_REQUESTED:
        body = (
            f"APPROVAL NEEDED {e.tool} {e.arguments} — {e.detail}\n"
            f"{'':28}keel approve {run} {e.call_id} --as NAME  |  "
            f"keel reject {run} {e.call_id} --as NAME --reason WHY"
        )
    elif k == EventKind.APPROVAL_DECIDED:
        body = f"approval of {e.tool} [{e.call_id}]: {e.detail}" + (f" by {e.by}" if e.by else "")
    elif k == EventKind.MESSAGE:
        body = f"message from {e.by or 'anyone'}: {e.text!r} — {e.detail}"
    else:
        body = f"ENDED {e.status}" + (f": {e.text}" if e.text else "")
    return f"{head} {body}"


class EventPrinter:
    """`keel watch RUN`'s output: a line per event, except a reply being written, which grows
    on one line as its pieces arrive (text, and tool calls as they are formed), is struck
    when a discard voids it, and is closed by the whole reply's line."""

    def __init__(self, run: str) -> None:
        self._run = run
        self._open: tuple[int, int] | None = None  # (step, attempt) of the line being written
        self._call = ""  # the tool call the line is writing, if any
        self._wrote = False  # the line has some of the reply on it

    def feed(self, offset: int, e: RunEvent) -> str:
        """What to print for this event (no newline at the end of a line still growing)."""
        k = e.kind
        if k == EventKind.MODEL_DELTA:
            out = ""
            if self._open != (e.step, e.attempt):
                out += self._close()
                out += f"{e.at:%H:%M:%S} #{offset:<4} step {e.step:<3} writing: "
                self._open, self._call, self._wrote = (e.step, e.attempt), "", False
            if e.call_id and e.call_id != self._call:
                out += f"{')' if self._call else ''}{'  ' if self._wrote else ''}→ {e.tool}("
                self._call = e.call_id
            self._wrote = True
            return out + e.text + e.arguments
        if k == EventKind.MODEL_DISCARD:
            struck = f" [{e.detail}: not the reply]" if self._open else ""
            self._open = None
            return struck + ("\n" if struck else "")
        written = self._open is not None and self._open[0] == e.step
        out = self._close()
        if k == EventKind.MODEL_REPLY and written:  # its text is on the line above
            e = e.model_copy(update={"text": ""})
        return out + event_line(self._run, offset, e) + "\n"

    def _close(self) -> str:
        if self._open is None:
            return ""
        self._open = None
        return ")\n" if self._call else "\n"


async def cmd_watch(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    if a.run:
        printer = EventPrinter(a.run)
        async for offset, event in agents.events(
            a.run, from_offset=a.from_offset, follow=not a.no_follow
        ):
            print(printer.feed(offset, event), end="", flush=True)
        return 0
    # every active run, in one table, redrawn when it changes
    shown = None
    while True:
        runs = [r for r in await agents.list() if r.status not in TERMINAL_VALUES]
        table = [f"{'RUN':32} {'AGENT':12} {'STATUS':17} {'STEPS':>5} {'TOKENS':>8} USER"] + [
            f"{r.run_id:32} {r.agent:12} {r.status:17} {r.steps:>5} {r.tokens:>8} {r.user}"
            for r in runs
        ]
        if table != shown:
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print("\n".join(table) if runs else "no active runs", flush=True)
            shown = table
        if a.once:
            return 0
        await asyncio.sleep(a.every)


async def cmd_transcript(a: argparse.Namespace, s: Settings) -> int:
    state = await (await _agents(s)).get_state(a.run)
    if a.json:
        _json([m.model_dump(exclude_none=True) for m in state.transcript])
        return 0
    for m in state.transcript:
        calls = "".join(f"\n    → {c.name}({c.arguments}) [{c.id}]" for c in m.tool_calls)
        who = f"tool {m.name} [{m.tool_call_id}]" if m.role == "tool" else m.role
        if m.summarizes:  # requests carry it in place of the messages it covers
            who = f"summary of messages 1-{m.summarizes - 1}"
        print(f"{who}: {m.content or ''}{calls}")
    print(f"-- {state.status.value}, {state.step} steps, {state.usage.total_tokens} tokens")
    return 0


async def cmd_approve(a: argparse.Namespace, s: Settings) -> int:
    edit = None
    if a.edit:
        try:
            edit = json.loads(a.edit)
        except json.JSONDecodeError as e:
            raise KeelClientError(f"--edit is not valid JSON: {e}") from e
        if not isinstance(edit, dict):
            raise KeelClientError("--edit must be a JSON object of arguments")
    key = load_approver_key(a.key, f"--key {a.key}") if a.key else None
    agents = await _agents(s)
    receipt = await agents.approve(
        a.run, a.call_id, a.as_user, edit=edit, wait=not a.no_wait, signing_key=key
    )
    if receipt.note:
        print(f"sent {receipt.decision.value} of {receipt.call_id} as {receipt.approver}")
        print(f"  {receipt.note}")
        return 0
    verb = {"approve": "approved", "edit": "approved with edits"}[receipt.decision.value]
    print(f"{verb} {receipt.call_id} as {receipt.approver}; runs with {receipt.arguments}")
    return 0


async def cmd_reject(a: argparse.Namespace, s: Settings) -> int:
    key = load_approver_key(a.key, f"--key {a.key}") if a.key else None
    agents = await _agents(s)
    receipt = await agents.reject(
        a.run, a.call_id, a.as_user, a.reason, wait=not a.no_wait, signing_key=key
    )
    print(f"rejected {receipt.call_id} as {receipt.approver}")
    if receipt.note:
        print(f"  {receipt.note}")
    return 0


async def cmd_say(a: argparse.Namespace, s: Settings) -> int:
    receipt = await (await _agents(s)).send_message(
        a.run, a.message, a.policy, sender=a.user, message_id=a.id
    )
    print(
        f"{receipt.status} ({receipt.policy.value}){': ' + receipt.reason if receipt.reason else ''}"
    )
    return 0 if receipt.status != "rejected" else 1


async def cmd_resume(a: argparse.Namespace, s: Settings) -> int:
    await (await _agents(s)).resume(a.run)
    print(f"asked {a.run} to try its model provider again now")
    return 0


async def cmd_cancel(a: argparse.Namespace, s: Settings) -> int:
    await (await _agents(s)).cancel(a.run)
    print(f"cancel requested for {a.run}")
    return 0


async def cmd_fork(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    run_id = await agents.fork(
        a.run,
        a.at_step,
        a.message,
        user=a.user,
        new_run_id=a.id,
        current_spec=a.current_spec,
    )
    print(run_id)
    return 0


async def cmd_pending(a: argparse.Namespace, s: Settings) -> int:
    pending = await (await _agents(s)).pending(as_user=a.as_user)
    if a.json:
        _json([p.model_dump() for p in pending])
        return 0
    if not pending:
        print("no pending approvals")
    for p in pending:
        if not p.reachable:
            print(f"{p.run_id} (unreachable) — {p.reason}")
            continue
        print(
            f"{p.run_id} {p.call_id} {p.tool}({json.dumps(p.arguments)}) "
            f"age={p.age_seconds:.0f}s — {p.reason}"
        )
    return 0


async def cmd_codec_server(a: argparse.Namespace, s: Settings) -> int:
    import dataclasses

    from keel.codec_server import codec_server_from_settings, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.cors_origin:
        s = dataclasses.replace(s, codec_cors_origins=tuple(a.cors_origin))
    await serve(codec_server_from_settings(s, host=a.host, port=a.port))
    return 0


async def cmd_keygen(a: argparse.Namespace, s: Settings) -> int:
    from keel.codec import new_key, new_token

    if a.signing:
        return _signing_keygen(a)
    print(new_token() if a.token else new_key(a.id))
    return 0


def _signing_keygen(a: argparse.Namespace) -> int:
    """An approver's key pair: the private key into a file of its own (0600), and the
    public key as the policy names it."""
    from keel.client.signing import new_signing_key

    if not a.id:
        raise KeelClientError("--signing needs --id NAME: the approver, as the policy names them")
    pem, public = new_signing_key()
    line = f'[users.{a.id}]\npublic_key = "{public}"'
    if a.out == "-":
        print(pem.decode(), end="")
        print(line)
        return 0
    path = os.path.expanduser(a.out or f"~/.keel/{a.id}.key")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeelClientError(f"{path} exists: keep it, or remove it first") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(f"# the private key of {a.id} is in {path}: keep it secret (keel approve --key {path})")
    print("# add to the workers' policy (KEEL_POLICY):")
    print(line)
    return 0


async def cmd_serve(a: argparse.Namespace, s: Settings) -> int:
    import uvicorn

    from keel.gateway import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = dataclasses.replace(s, api_host=a.host or s.api_host, api_port=a.port or s.api_port)
    if not s.api_tokens:
        create_app(s)  # says what is missing
    app = create_app(s, client=(await _agents(s)).client)  # Temporal first: said in one line
    config = uvicorn.Config(
        app, host=s.api_host, port=s.api_port, log_config=None, proxy_headers=False
    )
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except SystemExit:  # uvicorn's way of saying the port is taken (it logged why)
        raise KeelClientError(f"cannot serve on {s.api_host}:{s.api_port}") from None
    return 0


async def cmd_mcp(a: argparse.Namespace, s: Settings) -> int:
    from keel.client.mcp_server import http_server, local_server
    from keel.gateway.app import load_gateway_policy
    from keel.worker import load_agents

    ref = a.agents or s.agents
    agents = load_agents(ref) if ref else None
    policy = load_gateway_policy(s)
    if not a.http:
        user = a.user or s.user
        if not user:
            raise KeelClientError(
                "keel mcp acts as a user of the policy: name them with --user NAME or KEEL_USER "
                "(or serve many users with --http and KEEL_API_TOKENS)"
            )
        # stdout carries the protocol: nothing else may be printed there
        server = local_server(s, policy, (await _agents(s)).client, user, agents)
        await server.run_stdio_async()
        return 0
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = a.host or s.api_host, a.port
    if not s.api_tokens:
        http_server(s, policy, None, host, port, agents)  # says what is missing
    client = (await _agents(s)).client  # Temporal first: said in one line
    app = http_server(s, policy, client, host, port, agents).streamable_http_app()
    config = uvicorn.Config(app, host=host, port=port, log_config=None, proxy_headers=False)
    try:
        await uvicorn.Server(config).serve()
    except SystemExit:  # uvicorn's way of saying the port is taken (it logged why)
        raise KeelClientError(f"cannot serve on {host}:{port}") from None
    return 0


async def cmd_token(a: argparse.Namespace, s: Settings) -> int:
    """A fresh API token for a user: the token once, and the entry the tokens file keeps."""
    from datetime import date

    from keel.gateway.auth import new_token, token_entry

    name = a.name or f"{a.user}-{date.today():%Y%m%d}"
    token = new_token()
    # the token on stderr, the entry on stdout: `keel token new --user ann >> tokens.toml`
    print(
        f"# the token of {a.user}: shown once, keep it secret (the file keeps its hash only)\n"
        f"{token}",
        file=sys.stderr,
        flush=True,
    )
    print(f"# add to the tokens file ({s.api_tokens or 'KEEL_API_TOKENS'}):")
    print(token_entry(a.user, name, token), end="")
    return 0


async def cmd_chaos(a: argparse.Namespace, s: Settings) -> int:
    from keel.chaos.run import ChaosOptions, run_chaos

    opts = ChaosOptions(
        runs=a.runs,
        workers=a.workers,
        kill_every=a.kill_every,
        fault_rate=a.fault_rate,
        seed=a.seed,
        duration=a.duration,
        deadline=a.deadline,
        server_restart=not a.no_server_restart,
        address=a.address or os.environ.get("TEMPORAL_ADDRESS") or None,
        keep=a.keep,
    )
    return await run_chaos(opts, s)


async def cmd_schedule(a: argparse.Namespace, s: Settings) -> int:
    from keel.client.schedules import parse_every

    every = parse_every(a.every) if getattr(a, "every", None) else None
    if getattr(a, "task_queue", None):
        s = dataclasses.replace(s, task_queue=a.task_queue)
    schedules = (await _agents(s)).schedules
    if a.action == "create":
        await schedules.create(
            a.name,
            a.agent,
            a.message,
            cron=a.cron,
            every=every,
            user=a.user,
            overlap=a.overlap,
            paused=a.paused,
            note=a.note,
            loop=a.loop,
        )
        by = f" with {a.loop}" if a.loop != WORKFLOW_TYPE else ""
        print(
            f"schedule {a.name}: {a.agent}{by} on {a.cron or 'every ' + a.every}, "
            f"overlap {a.overlap}"
        )
    elif a.action == "list":
        found = await schedules.list()
        if a.json:
            _json([dataclasses.asdict(f) for f in found])
            return 0
        if not found:
            print("no schedules")
        for f in found:
            state = "paused" if f.paused else "active"
            nxt = f.next_runs[0].isoformat(timespec="seconds") if f.next_runs else "-"
            by = f" with {f.loop}" if f.loop != WORKFLOW_TYPE else ""
            print(
                f"{f.name} [{state}] {f.agent}{by} for {f.user or 'anyone'}: "
                f"{f.message[:60]!r} {f.when}, overlap {f.overlap}, next {nxt}"
            )
    elif a.action in ("pause", "unpause"):
        await getattr(schedules, a.action)(a.name, a.note)
        print(f"schedule {a.name}: {a.action}d")
    else:
        await getattr(schedules, a.action)(a.name)
        print(f"schedule {a.name}: {'triggered' if a.action == 'trigger' else 'deleted'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keel", description="Run AI agents durably on Temporal.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    add("dev", cmd_dev, "Temporal dev server + scripted model + worker, in the foreground")
    add("demo", cmd_demo, "the support demo, end to end").add_argument(
        "--yes", action="store_true", help="approve the refund without asking"
    )
    sp = add("worker", cmd_worker, "serve agents against TEMPORAL_ADDRESS")
    sp.add_argument(
        "--agents",
        default=None,
        help="the agents to serve, as module:attribute (default: $KEEL_AGENTS)",
    )
    sp.add_argument(
        "--resources",
        default=None,
        help="what tools get as ctx.resources: module:attribute of an object or a "
        "factory called once (default: $KEEL_RESOURCES)",
    )
    sp.add_argument(
        "--workflows",
        default=None,
        help="loops of your own to serve beside Keel's, as module:attribute of a "
        "KeelWorkflow class or a list (default: $KEEL_WORKFLOWS)",
    )
    sp.add_argument(
        "--activities",
        default=None,
        help="the activities those workflows call, as module:attribute of an activity or a "
        "list (default: $KEEL_ACTIVITIES)",
    )
    sp.add_argument(
        "--role",
        default=os.environ.get("KEEL_WORKER_ROLE") or "all",
        choices=["all", "workflows", "model", "tools"],
        help="what this process serves when model and tool calls have task queues of their "
        "own (KEEL_MODEL_TASK_QUEUE, KEEL_TOOL_TASK_QUEUE); default all",
    )
    queue_help = "the task queue its worker polls (default: $KEEL_TASK_QUEUE or keel-agents)"
    sp = add("start", cmd_start, "start a run")
    sp.add_argument("agent")
    sp.add_argument("message")
    sp.add_argument("--user", default="", help="who the run is for (default: $KEEL_USER)")
    sp.add_argument("--id", default=None, help="the run id (default: generated)")
    sp.add_argument("--wait", action="store_true", help="print the final answer")
    sp.add_argument(
        "--loop",
        default=WORKFLOW_TYPE,
        help="the workflow type that runs the agent (default: Keel's own loop)",
    )
    sp.add_argument("--task-queue", default=None, help=queue_help)
    sp = add("fork", cmd_fork, "a new run from the state a run had after step N")
    sp.add_argument("run")
    sp.add_argument("--at-step", type=int, required=True, help="the step to fork after")
    sp.add_argument("--message", default="", help="what the new run goes on with (default: none)")
    sp.add_argument("--user", default="", help="who the new run is for (default: $KEEL_USER)")
    sp.add_argument("--id", default=None, help="the new run's id (default: generated)")
    sp.add_argument(
        "--current-spec",
        action="store_true",
        help="run on the agent's spec as the workers have it now, not the run's snapshot",
    )
    sp = add("status", cmd_status, "a run's state")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")
    add("result", cmd_result, "wait for a run's answer").add_argument("run")
    sp = add("list", cmd_list, "recent runs")
    sp.add_argument("--status", default=None, choices=RUN_STATUSES)
    sp.add_argument("--json", action="store_true")
    sp.add_argument(
        "--as",
        dest="as_user",
        default=None,
        help="only the runs this user may see, as KEEL_POLICY says (default: $KEEL_USER)",
    )
    sp = add("watch", cmd_watch, "follow a run's events live (or, with no run, every active run)")
    sp.add_argument("run", nargs="?", default=None)
    sp.add_argument("--from", dest="from_offset", type=int, default=0, help="the first offset")
    sp.add_argument(
        "--no-follow", action="store_true", help="print what happened so far, then stop"
    )
    sp.add_argument("--once", action="store_true", help="(no run) print the table once")
    sp.add_argument("--every", type=float, default=2.0, help="(no run) seconds between refreshes")
    sp = add("transcript", cmd_transcript, "a run's whole conversation")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")
    key_help = "sign the decision with this key file (default: $KEEL_APPROVER_KEY)"
    sp = add("approve", cmd_approve, "approve a pending tool call")
    sp.add_argument("run")
    sp.add_argument("call_id")
    sp.add_argument("--as", dest="as_user", required=True)
    sp.add_argument("--key", default=None, help=key_help)
    sp.add_argument(
        "--edit", default=None, help="the arguments to change, as a JSON object (others stay)"
    )
    sp.add_argument(
        "--no-wait", action="store_true", help="send the decision and return (a signal)"
    )
    sp = add("reject", cmd_reject, "reject a pending tool call")
    sp.add_argument("run")
    sp.add_argument("call_id")
    sp.add_argument("--as", dest="as_user", required=True)
    sp.add_argument("--key", default=None, help=key_help)
    sp.add_argument("--reason", required=True)
    sp.add_argument(
        "--no-wait", action="store_true", help="send the decision and return (a signal)"
    )
    sp = add("say", cmd_say, "send a message to a run")
    sp.add_argument("run")
    sp.add_argument("message")
    sp.add_argument("--policy", choices=["queue", "interrupt", "rollback", "reject"])
    sp.add_argument(
        "--id", default=None, help="the message's id: sent again with it, it is delivered once"
    )
    sp.add_argument("--user", default="")
    add("cancel", cmd_cancel, "cancel a run").add_argument("run")
    add("resume", cmd_resume, "a run waiting on its model provider tries again now").add_argument(
        "run"
    )
    sp = add("pending", cmd_pending, "open approvals across runs")
    sp.add_argument("--json", action="store_true")
    sp.add_argument(
        "--as",
        dest="as_user",
        default=None,
        help="only in the runs this user may see, as KEEL_POLICY says (default: $KEEL_USER)",
    )
    sp = add(
        "codec-server",
        cmd_codec_server,
        "decrypt payloads for the Web UI and `temporal --codec-endpoint` (needs "
        "KEEL_ENCRYPTION_KEYS and KEEL_CODEC_AUTH_TOKEN)",
    )
    sp.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    sp.add_argument("--port", type=int, default=None, help="default: $KEEL_CODEC_PORT or 8081")
    sp.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        help="a Web UI origin allowed to call it (repeatable; default: "
        "$KEEL_CODEC_CORS_ORIGINS, or the origin of $KEEL_UI_URL)",
    )
    sp = add("keygen", cmd_keygen, "print a new encryption key as id:base64key")
    sp.add_argument("--id", default=None, help="the key's id (default: k<date>-<random>)")
    sp.add_argument(
        "--token", action="store_true", help="print a codec server token instead of a key"
    )
    sp.add_argument(
        "--signing",
        action="store_true",
        help="an approver's signing key pair instead (--id NAME): writes the private key "
        "to --out and prints the public key for the policy",
    )
    sp.add_argument(
        "--out",
        default=None,
        help="with --signing: the key file (default ~/.keel/ID.key; -: print)",
    )
    sp = add("serve", cmd_serve, "the HTTP API and its page (needs KEEL_API_TOKENS)")
    sp.add_argument(
        "--host", default=None, help="the address to listen on ($KEEL_API_HOST, 127.0.0.1)"
    )
    sp.add_argument("--port", type=int, default=None, help="the port ($KEEL_API_PORT, 8000)")
    sp = add(
        "mcp",
        cmd_mcp,
        "runs as an MCP server: over stdio as one user, or over HTTP with KEEL_API_TOKENS",
    )
    sp.add_argument("--user", default=None, help="(stdio) who you act as (default: $KEEL_USER)")
    sp.add_argument(
        "--agents",
        default=None,
        help="the agents list_agents describes, as module:attribute (default: $KEEL_AGENTS)",
    )
    sp.add_argument("--http", action="store_true", help="serve streamable HTTP at /mcp")
    sp.add_argument(
        "--host", default=None, help="(http) the address to listen on ($KEEL_API_HOST, 127.0.0.1)"
    )
    sp.add_argument("--port", type=int, default=8001, help="(http) the port (%(default)s)")
    sp = add("token", cmd_token, "API tokens for `keel serve`")
    token = sp.add_subparsers(dest="action", required=True)
    sc = token.add_parser("new", help="a fresh token for a user, and its tokens-file entry")
    sc.add_argument("--user", required=True, help="the policy user the token acts as")
    sc.add_argument("--name", default=None, help="the entry's name (default: USER-<date>)")
    sp = add(
        "chaos",
        cmd_chaos,
        "runs with side effects while workers are SIGKILLed, the server restarts and the "
        "model fails; then checks that nothing was lost or done twice",
    )
    sp.add_argument("--runs", type=int, default=20, help="concurrent runs (%(default)s)")
    sp.add_argument("--workers", type=int, default=3, help="worker processes (%(default)s)")
    sp.add_argument(
        "--kill-every", type=float, default=8.0, help="mean seconds between kills (0: none)"
    )
    sp.add_argument(
        "--fault-rate", type=float, default=0.1, help="share of model calls that fail (0.1)"
    )
    sp.add_argument("--seed", type=int, default=1, help="the random plan's seed (%(default)s)")
    sp.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (60)")
    sp.add_argument(
        "--deadline", type=float, default=120.0, help="then seconds for runs to finish (120)"
    )
    sp.add_argument(
        "--no-server-restart", action="store_true", help="do not restart the Temporal server"
    )
    sp.add_argument(
        "--address",
        default=None,
        help="an existing deployment's host:port (default: $TEMPORAL_ADDRESS, else an "
        "embedded dev server of its own)",
    )
    sp.add_argument("--keep", action="store_true", help="keep the temporary directory")
    sp = add("schedule", cmd_schedule, "start runs of an agent on a schedule (Temporal Schedules)")
    schedule = sp.add_subparsers(dest="action", required=True)
    sc = schedule.add_parser("create", help="a schedule that starts AGENT on MESSAGE")
    sc.add_argument("name")
    sc.add_argument("agent")
    sc.add_argument("message")
    when = sc.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='a cron expression, e.g. "0 9 * * 1-5" (UTC)')
    when.add_argument("--every", help="an interval: 30s, 15m, 2h, 1d")
    sc.add_argument("--user", default="")
    sc.add_argument(
        "--overlap",
        default="skip",
        choices=[
            "skip",
            "buffer_one",
            "buffer_all",
            "cancel_other",
            "terminate_other",
            "allow_all",
        ],
        help="when a run is still going at the next time (default: skip it)",
    )
    sc.add_argument("--paused", action="store_true", help="create it paused")
    sc.add_argument("--note", default="")
    sc.add_argument(
        "--loop",
        default=WORKFLOW_TYPE,
        help="the workflow type that runs the agent (default: Keel's own loop)",
    )
    sc.add_argument("--task-queue", default=None, help=queue_help)
    sc = schedule.add_parser("list", help="the schedules that start Keel runs")
    sc.add_argument("--json", action="store_true")
    sc.add_argument(
        "--task-queue",
        default=None,
        help="those whose runs go to this task queue (default: $KEEL_TASK_QUEUE or keel-agents)",
    )
    for action, help in (
        ("pause", "stop starting runs"),
        ("unpause", "start runs again"),
        ("trigger", "start a run now (the overlap policy applies)"),
        ("delete", "delete the schedule (runs it started go on)"),
    ):
        sc = schedule.add_parser(action, help=help)
        sc.add_argument("name")
        if action in ("pause", "unpause"):
            sc.add_argument("--note", default="")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `keel` console script."""
    try:
        code = _main(argv)
    except SystemExit as e:  # argparse's --help, and its usage errors (already printed)
        code = e.code if isinstance(e.code, int) else 1
    except BrokenPipeError:
        code = _reader_gone()
    # The SDK's native runtime threads can abort the interpreter's finalization
    # ("PyGILState_Release ... finalizing"); everything is flushed and closed by now.
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _reader_gone()
    except ValueError:  # closed already (`keel mcp`'s stdio transport closes it)
        pass
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    from keel.codec import PayloadDecryptError
    from keel.dev import DevStackError, stored_where_dev_stores

    args = parser().parse_args(argv)
    use_core_logging()
    try:
        settings = Settings.from_env()
        if args.fn is not cmd_worker:  # a worker stores where it is told, nowhere else
            settings = stored_where_dev_stores(settings)
        return asyncio.run(args.fn(args, settings))
    except KeyboardInterrupt:
        return 130
    except (KeelClientError, DevStackError, SettingsError, PayloadDecryptError) as e:
        print(f"keel: {e}", file=sys.stderr)
    except RPCError as e:
        print(f"keel: {e.message}", file=sys.stderr)
    return 1


def _reader_gone() -> int:
    """Whoever read the output stopped (`keel list | head -3`): what is left unread is
    dropped, quietly, as other command-line tools do; it is no failure of the command."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0
