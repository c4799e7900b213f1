"""MCP servers as an agent's toolsets: the declarations (`MCPStdio`, `MCPHttp`), how a listed
tool becomes a pinned `ToolSpec`, and the `keel.mcp_list_tools` activity.

A run lists each of its agent's servers once, when it starts, and records the result (the
tools' schemas, the options declared here applied, a digest of what the server said) in its
spec snapshot: replay and continue-as-new never ask the server again. Calls go through the
same `keel.run_tool` activity as any tool (see `ToolActivities`), over one session per server
per worker process (`keel.activities.mcp_client`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities.mcp_client import MCPConnections, result_text
from keel.workflows.models import (
    MCP_LIST_TOOLS,
    ApprovalPolicy,
    MCPListInput,
    MCPToolList,
    Policy,
    ToolResult,
    ToolSpec,
)

# OpenAI's function names: a name outside this is refused by the API, so a server's tool that
# would need one (`server.tool`, a name with spaces) is refused when it is listed instead
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MCP_TOOLSET_ERROR = "MCPToolsetError"  # a declaration that does not fit the server's list


@dataclass(frozen=True)
class Secret:
    """A value from the worker's environment, by reference: the agent's definition, the run's
    history and its payloads hold only the variable's name. `template` places it (e.g.
    `"Bearer {}"` for an Authorization header). Its value is scrubbed from the server's
    results."""

    name: str
    template: str = "{}"

    def value(self) -> str:
        """The value, read now from the worker's environment."""
        found = os.environ.get(self.name)
        if not found:
            raise MCPConfigError(f"secret {self.name!r} is not set in this worker's environment")
        return self.template.format(found)


class MCPConfigError(RuntimeError):
    """A server's declaration cannot be used here (a secret it needs is not set)."""


@dataclass(frozen=True)
class MCPServer:
    """What every MCP toolset declares besides how to reach its server.

    Names the model sees are `prefix + tool` (default prefix `<name>_`: `time_convert_time`).
    Not `server.tool`: OpenAI's function names must match ^[a-zA-Z0-9_-]{1,64}$, and the API
    refuses a dot. Every tool has side effects (never interrupted, recorded as an effect, its
    calls' idempotency key matters) unless named in `read_only`, or `trust_read_only_hint`
    lets the server's own `readOnlyHint` say so.
    """

    name: str
    _: KW_ONLY
    include: Sequence[str] | None = None  # the server's tools to offer (None: all)
    exclude: Sequence[str] = ()
    read_only: Sequence[str] = ()  # the server's tool names that change nothing
    trust_read_only_hint: bool = False
    approval: ApprovalPolicy | None = None  # for every tool of the server ...
    approvals: Mapping[str, ApprovalPolicy] = field(default_factory=dict)  # ... or per tool
    prefix: str | None = None
    timeout_seconds: float = 60.0
    heartbeat_seconds: float | None = None
    # a server that is down is retried like a model provider: with backoff, for a while
    max_attempts: int = 10
    initial_retry_seconds: float = 1.0
    secrets: Sequence[str] = ()  # more environment variables whose values results never show

    @property
    def tool_prefix(self) -> str:
        return f"{self.name}_" if self.prefix is None else self.prefix

    def owns(self, name: str) -> bool:
        """Whether a name the model sees may be one of this server's tools."""
        return name.startswith(self.tool_prefix)

    def secret_names(self) -> list[str]:
        """The environment variables whose values are scrubbed from this server's results."""
        refs = [v.name for v in self._references() if isinstance(v, Secret)]
        return sorted({*refs, *self.secrets})

    def _references(self) -> list[Any]:
        return []

    def pin(self, listed: Sequence[Any], agent: Any, policy: Policy | None) -> MCPToolList:
        """The server's listed tools (`mcp.types.Tool`) as this agent's run pins them; an
        option naming a tool the server does not have is refused (MCPConfigError)."""
        have = {t.name for t in listed}
        self._refuse_unknown(have, agent, policy)
        tools = []
        for t in sorted(listed, key=lambda t: t.name):
            if (self.include is not None and t.name not in self.include) or t.name in self.exclude:
                continue
            shown = self.tool_prefix + t.name
            if not TOOL_NAME.match(shown):
                raise MCPConfigError(
                    f"MCP server {self.name!r}: tool {t.name!r} would be offered as {shown!r}, "
                    "which model APIs refuse (names match ^[a-zA-Z0-9_-]{1,64}$); exclude it "
                    "or choose another prefix"
                )
            if any(x.name == shown for x in agent.tools):
                raise MCPConfigError(
                    f"agent {agent.name!r}: MCP server {self.name!r} offers {shown!r}, the name "
                    "of one of its own tools; choose another prefix"
                )
            hint = t.annotations.readOnlyHint if t.annotations is not None else None
            read_only = t.name in self.read_only or bool(self.trust_read_only_hint and hint)
            approval = (
                agent.approvals.get(shown)
                or self.approvals.get(t.name)
                or self.approval
                or ApprovalPolicy()
            )
            tools.append(
                ToolSpec(
                    name=shown,
                    description=t.description or t.title or t.name,
                    parameters=t.inputSchema or {"type": "object"},
                    side_effects=not read_only,
                    interruptible=read_only,
                    start_to_close_seconds=self.timeout_seconds,
                    heartbeat_seconds=self.heartbeat_seconds,
                    max_attempts=self.max_attempts,
                    initial_retry_seconds=self.initial_retry_seconds,
                    approval=approval,
                    secrets=self.secret_names(),
                    mcp_server=self.name,
                    mcp_tool=t.name,
                )
            )
        return MCPToolList(server=self.name, digest=digest(listed), tools=tools)

    def _refuse_unknown(self, have: set[str], agent: Any, policy: Policy | None) -> None:
        """Options and policy entries that name tools of this server it does not list: a
        misspelt approval would otherwise let the call run with no one asked."""
        shown = {self.tool_prefix + n for n in have}
        problems = []
        for what, names in (
            ("include", self.include or ()),
            ("exclude", self.exclude),
            ("read_only", self.read_only),
            ("approvals", self.approvals),
        ):
            unknown = sorted(set(names) - have)
            if unknown:
                problems.append(f"{what} names {', '.join(unknown)}")
        unknown = sorted(n for n in agent.approvals if self.owns(n) and n not in shown)
        if unknown:
            problems.append(f"the agent's approvals name {', '.join(unknown)}")
        if policy is not None:
            entry = policy.agents.get(agent.name)
            named = [*(entry.tools or [] if entry else []), *policy.tools]
            unknown = sorted({n for n in named if self.owns(n) and n not in shown})
            if unknown:
                problems.append(f"the policy names {', '.join(unknown)}")
        if problems:
            raise MCPConfigError(
                f"agent {agent.name!r}, MCP server {self.name!r}: {'; '.join(problems)}, which "
                f"the server does not list (it lists: {', '.join(sorted(have)) or 'nothing'})"
            )


@dataclass(frozen=True)
class MCPStdio(MCPServer):
    """An MCP server the worker starts as a process and talks to over stdin/stdout. `env` is
    added to the worker's basic environment (PATH, HOME, ...); a value may be a `Secret`."""

    command: str
    args: Sequence[str] = ()
    env: Mapping[str, str | Secret] = field(default_factory=dict)
    cwd: str | None = None

    def _references(self) -> list[Any]:
        return list(self.env.values())

    def resolved_env(self) -> dict[str, str]:
        """The environment the process gets: secrets read now, from the worker's."""
        return {k: v.value() if isinstance(v, Secret) else v for k, v in self.env.items()}


@dataclass(frozen=True)
class MCPHttp(MCPServer):
    """An MCP server over streamable HTTP at `url`; a header's value may be a `Secret`."""

    url: str
    headers: Mapping[str, str | Secret] = field(default_factory=dict)

    def _references(self) -> list[Any]:
        return list(self.headers.values())

    def resolved_headers(self) -> dict[str, str]:
        """The headers sent: secrets read now, from the worker's environment."""
        return {k: v.value() if isinstance(v, Secret) else v for k, v in self.headers.items()}


def digest(listed: Sequence[Any]) -> str:
    """sha256 of what a server lists (each tool's name, description, schema and hints), in a
    canonical form: the same list always has the same digest."""
    canonical = sorted(
        (t.model_dump(mode="json", exclude_none=True, exclude={"meta", "icons"}) for t in listed),
        key=lambda t: t["name"],
    )
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class MCPToolsets:
    """The MCP servers of the agents a worker serves, their connections, and the activity that
    lists a server's tools for a run."""

    def __init__(self, agents: Sequence[Any], policy: Policy | None = None) -> None:
        self._agents = {a.name: a for a in agents}
        self.policy = policy
        self.servers: dict[str, MCPServer] = {}
        for a in agents:
            for s in a.toolsets:
                if self.servers.setdefault(s.name, s) != s:
                    raise ValueError(
                        f"two different MCP servers are named {s.name!r}; give each its own name"
                    )
        self.connections = MCPConnections()

    @activity.defn(name=MCP_LIST_TOOLS)
    async def list_tools(self, input: MCPListInput) -> MCPToolList:
        """The server's tools as this agent's run pins them. A server that cannot be reached
        raises a retryable error; a declaration that does not fit its list, a clear
        non-retryable one (the run fails saying what to fix)."""
        agent = self._agents.get(input.agent)
        server = (
            next((s for s in agent.toolsets if s.name == input.server), None) if agent else None
        )
        if agent is None or server is None:
            raise ApplicationError(
                f"this worker does not serve MCP server {input.server!r} for agent {input.agent!r}",
                type=MCP_TOOLSET_ERROR,
                non_retryable=True,
            )
        try:
            listed = await self.connections.list_tools(server)
            return server.pin(listed, agent, self.policy)
        except MCPConfigError as e:
            raise ApplicationError(str(e), type=MCP_TOOLSET_ERROR, non_retryable=True) from None

    async def call(
        self, server: MCPServer, tool: str, arguments: dict[str, Any], meta: dict[str, Any]
    ) -> ToolResult:
        """One call of a server's tool; an `isError` result is an error result for the model."""
        result = await self.connections.call_tool(server, tool, arguments, meta)
        text = result_text(result)
        if result.isError:
            return ToolResult(ok=False, error_type="tool_error", content=f"Error: {text}")
        return ToolResult(ok=True, content=text)

    async def close(self) -> None:
        """Close every server's session (and stop the processes started for them)."""
        await self.connections.close()
