"""Agents defined in Python, and the registry a worker resolves them from."""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities.mcp import MCPServer, MCPToolsets
from keel.activities.tools import Tool, ToolContext
from keel.policy_file import PolicyError, parse_policy
from keel.workflows import errors
from keel.workflows.authz import allowed_tools
from keel.workflows.models import (
    LOAD_AGENT_SPEC,
    AgentSpec,
    ApprovalMode,
    ApprovalPolicy,
    ApprovalTimeoutAction,
    Compaction,
    Limits,
    LoadAgentInput,
    MCPPin,
    MessagePolicy,
    ModelSettings,
    Policy,
    SubAgentArgs,
    ToolSpec,
)

log = logging.getLogger("keel.worker")


class AgentDefinitionError(ValueError):
    """An agent defined with a setting that cannot hold (a name that is no tool of its)."""


@dataclass
class Agent:
    """An agent: instructions, model, tools and the policies its runs keep."""

    name: str
    instructions: str
    tools: list[Tool] = field(default_factory=list)
    model: ModelSettings = field(default_factory=ModelSettings)
    limits: Limits = field(default_factory=Limits)
    message_policy: MessagePolicy = MessagePolicy.QUEUE
    keep_open_seconds: float = 0.0
    approval_timeout_seconds: float = 24 * 3600.0
    on_approval_timeout: ApprovalTimeoutAction = ApprovalTimeoutAction.REJECT
    approvals: dict[str, ApprovalPolicy] = field(default_factory=dict)  # per-tool overrides
    compaction: Compaction | None = None  # summarise the oldest turns of long conversations
    # MCP servers whose tools it may call (MCPStdio, MCPHttp): listed once per run, pinned
    toolsets: list[MCPServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings that name no tool of this agent: a misspelt key in `approvals`
        would otherwise drop the approval, and the side effect would run with no one asked.
        The registry checks again, for an agent changed after it was made."""
        names = [t.name for t in self.tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise AgentDefinitionError(
                f"agent {self.name!r}: two of its tools are named {twice[0]!r}; "
                "give each a name of its own (tool(name=...))"
            )
        servers = [s.name for s in self.toolsets]
        if len(set(servers)) < len(servers):
            raise AgentDefinitionError(
                f"agent {self.name!r}: two of its MCP servers have the same name; "
                "give each a name of its own"
            )
        # an MCP server's tools are known once it is listed: its names are checked then
        unknown = sorted(n for n in set(self.approvals) - set(names) if not self.mcp_owned(n))
        if unknown:
            raise AgentDefinitionError(
                f"agent {self.name!r}: approvals names {_listed(unknown)}, which is not one "
                f"of its tools ({_listed(sorted(names)) or 'it has none'})"
            )
        for t in self.tools:
            policy = self.approvals.get(t.name)
            if t.spec.local and policy is not None and policy.mode != ApprovalMode.NEVER:
                raise AgentDefinitionError(
                    f"agent {self.name!r}: tool {t.name!r} runs locally (local=True), so it "
                    "cannot need an approval; make it an ordinary tool"
                )

    def mcp_owned(self, name: str) -> bool:
        """Whether `name` may be a tool of one of its MCP servers (known once listed)."""
        return any(s.owns(name) for s in self.toolsets)

    def as_tool(
        self,
        name: str | None = None,
        description: str | None = None,
        *,
        side_effects: bool | None = None,
        interruptible: bool | None = None,
        approval: ApprovalPolicy | None = None,
    ) -> Tool:
        """This agent as another agent's tool. Each call runs it as a child workflow with its
        own history, budgets and approvals; its answer is the tool's result. The worker that
        serves the parent serves this agent too.

        It has side effects when any tool it (or its own sub-agents) may call has: then, like
        any side-effecting tool, an interrupt of the parent lets it finish rather than cut it
        short, and the parent records the call as an effect naming the child's run."""
        if self.keep_open_seconds > 0:
            raise ValueError(
                f"agent {self.name!r} keeps its conversation open, so as a tool it would "
                "never answer; give the sub-agent keep_open_seconds=0"
            )
        if side_effects is None:
            side_effects = any(t.spec.side_effects for a in with_subagents([self]) for t in a.tools)
        spec = ToolSpec(
            name=name or self.name.replace("-", "_"),
            description=description or f"Ask the {self.name} agent: {self.instructions[:200]}",
            parameters=SubAgentArgs.model_json_schema(),
            side_effects=side_effects,
            interruptible=(not side_effects) if interruptible is None else interruptible,
            max_attempts=1,
            approval=approval or ApprovalPolicy(),
            agent=self.name,
        )
        return Tool(fn=_runs_as_child, args_model=SubAgentArgs, spec=spec, agent=self)

    def spec(self) -> AgentSpec:
        """The snapshot a run records: plain data, no functions."""
        tools = []
        for t in self.tools:
            s = t.spec
            if t.name in self.approvals:
                s = s.model_copy(update={"approval": self.approvals[t.name]})
            tools.append(s)
        return AgentSpec(
            name=self.name,
            instructions=self.instructions,
            model=self.model,
            tools=tools,
            limits=self.limits,
            message_policy=self.message_policy,
            keep_open_seconds=self.keep_open_seconds,
            approval_timeout_seconds=self.approval_timeout_seconds,
            on_approval_timeout=self.on_approval_timeout,
            compaction=self.compaction,
            mcp=[MCPPin(server=s.name) for s in self.toolsets],
        )


async def _runs_as_child(args: SubAgentArgs, ctx: ToolContext) -> str:
    raise RuntimeError("a sub-agent runs as a child workflow, not as an activity")


def with_subagents(agents: list[Agent]) -> list[Agent]:
    """These agents and every agent they use as a tool, each once (names must be unique)."""
    found: dict[str, Agent] = {}
    todo = list(agents)
    while todo:
        a = todo.pop(0)
        if a.name in found:
            if found[a.name] is not a and found[a.name] != a:
                raise ValueError(f"two different agents are named {a.name!r}")
            continue
        found[a.name] = a
        todo.extend(t.agent for t in a.tools if t.agent is not None)
    return list(found.values())


def load_policy(path: str | Path) -> Policy:
    """A policy file (`.toml`, or `.json`), checked; PolicyError says what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"cannot read the policy file {p}: {e}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise PolicyError(
            f"the policy file {p} is not valid {p.suffix[1:] or 'TOML'}: {e}"
        ) from None
    if not isinstance(data, dict):
        raise PolicyError(f"the policy file {p} must hold an object")
    try:
        return parse_policy(data)
    except PolicyError as e:
        raise PolicyError(f"{p}: {e}") from None


def check_policy(policy: Policy, agents: list[Agent]) -> None:
    """Refuse a policy that names tools the agents served here do not have: a typo would
    otherwise take a tool away (`agents.X.tools`) or leave its approvers unset
    (`tools.X`), unnoticed. Agents it names but this worker does not serve are left alone:
    one policy may serve several workers; so are the tools such a policy names that none of
    this worker's agents has (they may be those agents' tools), with a warning."""
    by_name = {a.name: a for a in agents}
    for name, entry in policy.agents.items():
        agent = by_name.get(name)
        if agent is None or entry.tools is None:
            continue
        have = {t.name for t in agent.tools}
        unknown = sorted(n for n in set(entry.tools) - have if not agent.mcp_owned(n))
        if unknown:
            raise PolicyError(
                f"policy: agents.{name}.tools names {_listed(unknown)}, which agent {name!r} "
                f"does not have (its tools: {_listed(sorted(have)) or 'none'})"
            )
    have = {t.name for a in agents for t in a.tools}
    # names an MCP server's tools may have are checked when a run lists that server
    unknown = sorted(n for n in set(policy.tools) - have if not any(a.mcp_owned(n) for a in agents))
    if not unknown or not agents:
        return
    named = set(policy.agents) | {n for r in policy.roles.values() for n in r.agents}
    elsewhere = sorted(named - set(by_name) - {"*"})
    where = f"policy: tools names {_listed(unknown)}, which no agent served here has"
    if not elsewhere:
        raise PolicyError(f"{where} (their tools: {_listed(sorted(have)) or 'none'})")
    log.warning(
        "%s; left as is, as the policy also names agents served elsewhere (%s)",
        where,
        ", ".join(elsewhere),
    )


def _listed(names: list[str]) -> str:
    return ", ".join(names)


class AgentRegistry:
    """The agents a worker serves (with their sub-agents); `load_agent_spec` resolves a
    name to its spec, with the worker's policy (if any) in it."""

    def __init__(
        self,
        agents: list[Agent],
        default_model: str = "",
        payload_storage: bool = False,
        task_queues: tuple[str, str] = ("", ""),
        policy: Policy | None = None,
    ) -> None:
        self._agents = {a.name: a for a in with_subagents(agents)}
        for a in self._agents.values():
            a.check()
        self._default_model = default_model
        self._payload_storage = payload_storage
        self._task_queues = task_queues  # (model calls, tool calls); "": the run's own
        if policy is not None:
            # checked and named (digest) the same way whether it came from a file or from code
            policy = parse_policy(policy.model_dump(mode="json", exclude={"digest"}))
            check_policy(policy, list(self._agents.values()))
        self.policy = policy
        self.mcp = MCPToolsets(list(self._agents.values()), policy)

    @property
    def names(self) -> list[str]:
        return sorted(self._agents)

    def tools(self) -> list[Tool]:
        """Every tool any agent uses, once each."""
        seen: dict[str, Tool] = {}
        for a in self._agents.values():
            for t in a.tools:
                if seen.setdefault(t.name, t) != t:
                    raise ValueError(f"two different tools are named {t.name!r}")
        return list(seen.values())

    @activity.defn(name=LOAD_AGENT_SPEC)
    async def load_agent_spec(self, input: LoadAgentInput) -> AgentSpec:
        """The agent's spec, or a clear non-retryable error naming the agents there are.
        With a policy, the spec offers only the tools it allows and records the policy."""
        agent = self._agents.get(input.agent)
        if agent is None:
            raise ApplicationError(
                f"unknown agent {input.agent!r}; this worker serves: {', '.join(self.names)}",
                type=errors.AGENT_NOT_FOUND,
                non_retryable=True,
            )
        spec = agent.spec()
        spec.payload_storage = self._payload_storage
        spec.model_task_queue, spec.tool_task_queue = self._task_queues
        if not spec.model.model and self._default_model:
            # the snapshot names the model the run really talks to
            spec.model = spec.model.model_copy(update={"model": self._default_model})
        if self.policy is not None:
            spec.tools = allowed_tools(self.policy, spec.name, spec.tools)
            spec.policy = self.policy
        return spec
