"""Tools: the `@tool` decorator and the one `run_tool` activity that validates and dispatches."""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, get_type_hints

from mcp.shared.exceptions import McpError
from pydantic import BaseModel, ValidationError
from temporalio import activity

from keel.activities.heartbeat import annotate_span, heartbeat_while
from keel.workflows.models import (
    RUN_TOOL,
    ApprovalMode,
    ApprovalPolicy,
    ToolInput,
    ToolResult,
    ToolSpec,
)
from keel.workflows.policy import parse_arguments


@dataclass(frozen=True)
class ToolContext:
    """What a tool gets besides its arguments: who calls, the idempotency key, resources."""

    agent: str
    call_id: str
    idempotency_key: str
    run_id: str
    user: str
    resources: Any = None  # whatever the worker was given (a database, an HTTP client, ...)
    secrets: tuple[str, ...] = ()  # the names this tool declared (`tool(secrets=[...])`)

    def secret(self, name: str) -> str:
        """A secret from the worker's environment, by reference: the run's history and
        payloads only ever hold its name. The tool must declare it (`tool(secrets=[...])`);
        a value that shows up in the tool's result is replaced by `[secret NAME]`."""
        if name not in self.secrets:
            raise SecretError(
                f"tool may read only the secrets it declares ({', '.join(self.secrets) or 'none'}),"
                f" not {name!r}: add it to @tool(secrets=[...])"
            )
        value = os.environ.get(name)
        if not value:
            raise SecretError(f"secret {name!r} is not set in this worker's environment")
        return value

    def heartbeat(self, *details: Any) -> None:
        """Tell Temporal the tool is alive (and learn of a cancellation)."""
        if activity.in_activity() and not activity.info().is_local:
            activity.heartbeat(*details)


ToolFn = Callable[[Any, ToolContext], Awaitable[Any]]


class SecretError(RuntimeError):
    """A tool asked for a secret it did not declare, or one the worker does not have."""


def redact(text: str, names: Sequence[str]) -> str:
    """`text` with the values of these secrets (from the worker's environment) replaced."""
    for name in names:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"[secret {name}]")
    return text


@dataclass(frozen=True)
class Tool:
    """A typed async function and the options it runs with (or, with `agent` set, another
    agent that runs as a child workflow: see `Agent.as_tool`)."""

    fn: ToolFn
    args_model: type[BaseModel]
    spec: ToolSpec
    agent: Any = None  # the sub-agent (an Agent) this tool runs, if any

    @property
    def name(self) -> str:
        return self.spec.name


def tool(
    fn: ToolFn | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    side_effects: bool = False,
    interruptible: bool | None = None,
    timeout_seconds: float = 60.0,
    heartbeat_seconds: float | None = None,
    max_attempts: int = 5,
    initial_retry_seconds: float = 1.0,
    approval: ApprovalPolicy | None = None,
    local: bool = False,
    secrets: Sequence[str] = (),
) -> Any:
    """Make a `Tool` of `async def f(args: SomeModel, ctx: ToolContext) -> str | model | dict`.

    The JSON schema the model sees comes from the arguments model; the description from
    the docstring. Side-effecting tools are not interruptible unless said otherwise.

    `local=True` runs a read-only tool as a local activity: in the worker that handles the
    model's reply, inside that same workflow task, so the step costs one task instead of
    two. What it gives up: its result enters the history with the step (a marker, not an
    activity's own events); its retries run in that worker (a retry longer than a minute
    waits on a timer), and no other worker can take it over mid-attempt; it does not
    heartbeat (a worker's death is noticed by the workflow task's timeout, 10 s). Refused for
    tools with side effects or an approval policy.
    """
    if local and side_effects:
        raise ValueError(
            "local=True is for read-only tools: a tool with side effects runs as an activity "
            "of its own (its own retries, heartbeats and history events)"
        )
    if local and approval is not None and approval.mode != ApprovalMode.NEVER:
        raise ValueError("local=True is for tools that run at once: this one has an approval")

    def wrap(f: ToolFn) -> Tool:
        if not inspect.iscoroutinefunction(f):
            raise TypeError(f"tool {f.__name__} must be an async function")
        params = list(inspect.signature(f).parameters)
        hints = get_type_hints(f)
        args_model = hints.get(params[0]) if params else None
        if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
            raise TypeError(f"tool {f.__name__}: first parameter must be a pydantic model")
        spec = ToolSpec(
            name=name or f.__name__,
            description=description or inspect.cleandoc(f.__doc__ or "") or f.__name__,
            parameters=args_model.model_json_schema(),
            side_effects=side_effects,
            interruptible=(not side_effects) if interruptible is None else interruptible,
            start_to_close_seconds=timeout_seconds,
            heartbeat_seconds=heartbeat_seconds,
            max_attempts=max_attempts,
            initial_retry_seconds=initial_retry_seconds,
            approval=approval or ApprovalPolicy(),
            local=local,
            secrets=list(secrets),
        )
        return Tool(fn=f, args_model=args_model, spec=spec)

    return wrap(fn) if fn is not None else wrap


# A tool result goes into history and into every later model request: keep it bounded.
MAX_RESULT_CHARS = 100_000


def _render(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, BaseModel):
        text = value.model_dump_json()
    else:
        text = json.dumps(value, default=str)
    if len(text) > MAX_RESULT_CHARS:
        cut = len(text) - MAX_RESULT_CHARS
        text = text[:MAX_RESULT_CHARS] + f"\n[... {cut} more characters truncated]"
    return text


class ToolActivities:
    """The `run_tool` activity over the tools a worker knows, and those of its MCP servers."""

    def __init__(self, tools: list[Tool], resources: Any = None, mcp: Any = None) -> None:
        # sub-agents are child workflows, never activities
        self._tools = {t.name: t for t in tools if t.agent is None}
        self._resources = resources
        self._mcp = mcp  # MCPToolsets, when an agent served here has MCP servers

    @activity.defn(name=RUN_TOOL)
    async def run_tool(self, input: ToolInput) -> ToolResult:
        """Validate the arguments and run the tool; bad calls come back as results, not errors.

        An exception from the tool itself propagates, so Temporal retries it with the
        tool's retry policy.
        """
        if input.mcp_server:
            return await self._run_mcp(input)
        t = self._tools.get(input.tool)
        if t is None:
            known = ", ".join(sorted(self._tools)) or "none"
            return ToolResult(
                ok=False,
                error_type="unknown_tool",
                content=f"Error: there is no tool named {input.tool!r}. Available tools: {known}.",
            )
        raw, problem = parse_arguments(input.arguments)
        if raw is None:
            return ToolResult(ok=False, error_type="invalid_arguments", content=f"Error: {problem}")
        try:
            args = t.args_model.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in e.errors()
            )
            return ToolResult(
                ok=False,
                error_type="invalid_arguments",
                content=f"Error: invalid arguments for {t.name}: {problems}",
            )
        return await self._measured(input, t.fn(args, self._context(input, t)), t.spec.secrets)

    def _context(self, input: ToolInput, t: Tool) -> ToolContext:
        return ToolContext(
            agent=input.agent,
            call_id=input.call_id,
            idempotency_key=input.idempotency_key,
            run_id=input.run_id,
            user=input.user,
            resources=self._resources,
            secrets=tuple(t.spec.secrets),
        )

    async def _run_mcp(self, input: ToolInput) -> ToolResult:
        """Call a tool of an MCP server with the call's idempotency key in the request's
        `_meta`. The server's own errors (an `isError` result, a JSON-RPC error) are the
        model's to read; a server that cannot be reached raises, and is retried."""
        server = self._mcp.servers.get(input.mcp_server) if self._mcp is not None else None
        if server is None:
            return ToolResult(
                ok=False,
                error_type="unknown_tool",
                content=f"Error: this worker has no MCP server named {input.mcp_server!r}.",
            )
        raw, problem = parse_arguments(input.arguments)
        if raw is None:
            return ToolResult(ok=False, error_type="invalid_arguments", content=f"Error: {problem}")
        meta = {
            "keel/idempotency_key": input.idempotency_key,
            "keel/run_id": input.run_id,
            "keel/call_id": input.call_id,
        }
        return await self._measured(
            input,
            self._mcp.call(server, input.mcp_tool, raw, meta),
            server.secret_names(),
        )

    async def _measured(self, input: ToolInput, run: Any, secrets: Sequence[str]) -> ToolResult:
        """Await a tool (heartbeating), with its metrics and span; its result rendered,
        bounded and scrubbed of secrets."""
        name = input.tool
        # heartbeats while the tool runs: a dead worker is noticed within seconds, and a
        # cancellation (interrupt, keel cancel) reaches the tool
        meter = activity.metric_meter().with_additional_attributes(
            {"agent": input.agent, "tool": name}
        )
        calls = meter.create_counter("keel_tool_calls", "tool calls, by outcome")
        began = time.monotonic()
        try:
            result = await heartbeat_while(run)
        except McpError as e:  # the MCP server's own error: an answer, not a failure to retry
            calls.add(1, {"outcome": "error"})
            said = redact(_render(f"Error: {e.error.message}"), secrets)
            return ToolResult(ok=False, error_type="tool_error", content=said)
        except BaseException as e:
            calls.add(1, {"outcome": "raised"})  # retried by its policy, or cancelled
            annotate_span({"keel.tool": name, "keel.outcome": f"raised {type(e).__name__}"})
            said = str(e)
            if isinstance(e, Exception) and redact(said, secrets) != said:
                # the failure's message goes into the history: never with a secret in it
                raise RuntimeError(f"{type(e).__name__}: {redact(said, secrets)}") from None
            raise
        annotate_span({"keel.tool": name, "keel.call_id": input.call_id, "keel.outcome": "ok"})
        meter.create_histogram_timedelta("keel_tool_latency", "a tool call", "ms").record(
            timedelta(seconds=time.monotonic() - began)
        )
        if isinstance(result, ToolResult):  # an MCP tool's: `isError` is the model's to read
            calls.add(1, {"outcome": "ok" if result.ok else "error"})
            return result.model_copy(update={"content": redact(_render(result.content), secrets)})
        calls.add(1, {"outcome": "ok"})
        return ToolResult(ok=True, content=redact(_render(result), secrets))
