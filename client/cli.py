"""The `keel` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio.service import RPCError

from keel.client.api import AgentClient, KeelClientError, NoWorker
from keel.config import Settings, SettingsError
from keel.workflows.models import WORKFLOW_TYPE, AgentStatus

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
    from keel.client.dev import run_dev

    await run_dev(s)
    return 0


async def cmd_demo(a: argparse.Namespace, s: Settings) -> int:
    from keel.client.demo import run_demo

    return await run_demo(s, yes=a.yes)


async def cmd_worker(a: argparse.Namespace, s: Settings) -> int:
    from keel.serve import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        await run_worker(s, agents=a.agents, resources=a.resources, workflows=a.workflows)
    except RuntimeError as e:  # the SDK's "failed client connect" and the like
        raise KeelClientError(f"worker: {e} (TEMPORAL_ADDRESS is {s.address})") from e
    return 0


async def cmd_start(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    run_id = await agents.start(a.agent, a.message, user=a.user, run_id=a.id, loop=a.loop)
    if not a.wait:
        print(run_id)
        return 0
    result = await agents.result(run_id)
    if result.final_answer:
        print(result.final_answer)
    if result.status.value not in ("completed", "idle"):
        print(f"run {run_id} ended {result.status.value}: {result.error}", file=sys.stderr)
        return 1
    return 0


async def cmd_status(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    try:
        state = await agents.get_state(a.run)
    except NoWorker as e:
        # what Temporal itself knows, which needs no worker
        summary = await agents.summary(a.run)
        if summary.temporal_status == "running":
            raise
        if a.json:
            _json(summary.model_dump())
            return 0
        print(
            f"{a.run}: {summary.status or summary.temporal_status} (Temporal: "
            f"{summary.temporal_status}), step {summary.steps}, {summary.tokens} tokens"
        )
        if summary.error:
            print(f"  ended: {summary.error}")
        print(f"  {e}", file=sys.stderr)
        return 0
    if a.json:
        print(state.model_dump_json(indent=2))
        return 0
    print(f"{a.run}: {state.status.value}, step {state.step}, {state.usage.total_tokens} tokens")
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
    result = await (await _agents(s)).result(a.run)
    if result.final_answer:
        print(result.final_answer)
    if result.error:
        print(f"{result.status.value}: {result.error}", file=sys.stderr)
    return 0 if result.status.value in ("completed", "idle") else 1


async def cmd_list(a: argparse.Namespace, s: Settings) -> int:
    runs = await (await _agents(s)).list(status=a.status)
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


async def cmd_approve(a: argparse.Namespace, s: Settings) -> int:
    edit = None
    if a.edit:
        try:
            edit = json.loads(a.edit)
        except json.JSONDecodeError as e:
            raise KeelClientError(f"--edit is not valid JSON: {e}") from e
        if not isinstance(edit, dict):
            raise KeelClientError("--edit must be a JSON object of arguments")
    agents = await _agents(s)
    receipt = await agents.approve(a.run, a.call_id, a.as_user, edit=edit, wait=not a.no_wait)
    if receipt.note:
        print(f"sent {receipt.decision.value} of {receipt.call_id} as {receipt.approver}")
        print(f"  {receipt.note}")
        return 0
    verb = {"approve": "approved", "edit": "approved with edits"}[receipt.decision.value]
    print(f"{verb} {receipt.call_id} as {receipt.approver}; runs with {receipt.arguments}")
    return 0


async def cmd_reject(a: argparse.Namespace, s: Settings) -> int:
    agents = await _agents(s)
    receipt = await agents.reject(a.run, a.call_id, a.as_user, a.reason, wait=not a.no_wait)
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


async def cmd_pending(a: argparse.Namespace, s: Settings) -> int:
    pending = await (await _agents(s)).pending()
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
    sp = add("start", cmd_start, "start a run")
    sp.add_argument("agent")
    sp.add_argument("message")
    sp.add_argument("--user", default="")
    sp.add_argument("--id", default=None, help="the run id (default: generated)")
    sp.add_argument("--wait", action="store_true", help="print the final answer")
    sp.add_argument(
        "--loop",
        default=WORKFLOW_TYPE,
        help="the workflow type that runs the agent (default: Keel's own loop)",
    )
    sp = add("status", cmd_status, "a run's state")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")
    add("result", cmd_result, "wait for a run's answer").add_argument("run")
    sp = add("list", cmd_list, "recent runs")
    sp.add_argument("--status", default=None, choices=[st.value for st in AgentStatus])
    sp.add_argument("--json", action="store_true")
    sp = add("approve", cmd_approve, "approve a pending tool call")
    sp.add_argument("run")
    sp.add_argument("call_id")
    sp.add_argument("--as", dest="as_user", required=True)
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
    add("pending", cmd_pending, "open approvals across runs").add_argument(
        "--json", action="store_true"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `keel` console script."""
    from keel.client.dev import DevStackError

    args = parser().parse_args(argv)
    try:
        code = asyncio.run(args.fn(args, Settings.from_env()))
    except KeyboardInterrupt:
        code = 130
    except (KeelClientError, DevStackError, SettingsError) as e:
        print(f"keel: {e}", file=sys.stderr)
        code = 1
    except RPCError as e:
        print(f"keel: {e.message}", file=sys.stderr)
        code = 1
    # The SDK's native runtime threads can abort the interpreter's finalization
    # ("PyGILState_Release ... finalizing"); everything is flushed and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
