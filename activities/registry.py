"""Agents defined in Python, and the registry a worker resolves them from."""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.tools import Tool
from workflows import errors
from workflows.models import (
    AgentSpec,
    ApprovalPolicy,
    ApprovalTimeoutAction,
    Limits,
    LoadAgentInput,
    MessagePolicy,
    ModelSettings,
)


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
        )


class AgentRegistry:
    """The agents a worker serves; `load_agent_spec` resolves a name to its spec."""

    def __init__(self, agents: list[Agent], default_model: str = "") -> None:
        self._agents = {a.name: a for a in agents}
        self._default_model = default_model
        names = [a.name for a in agents]
        if len(names) != len(self._agents):
            raise ValueError(f"agent names must be unique: {names}")

    @property
    def names(self) -> list[str]:
        return sorted(self._agents)

    def tools(self) -> list[Tool]:
        """Every tool any agent uses, once each."""
        seen: dict[str, Tool] = {}
        for a in self._agents.values():
            for t in a.tools:
                if seen.setdefault(t.name, t) is not t:
                    raise ValueError(f"two different tools are named {t.name!r}")
        return list(seen.values())

    @activity.defn(name="load_agent_spec")
    async def load_agent_spec(self, input: LoadAgentInput) -> AgentSpec:
        """The agent's spec, or a clear non-retryable error naming the agents there are."""
        agent = self._agents.get(input.agent)
        if agent is None:
            raise ApplicationError(
                f"unknown agent {input.agent!r}; this worker serves: {', '.join(self.names)}",
                type=errors.AGENT_NOT_FOUND,
                non_retryable=True,
            )
        spec = agent.spec()
        if not spec.model.model and self._default_model:
            # the snapshot names the model the run really talks to
            spec.model = spec.model.model_copy(update={"model": self._default_model})
        return spec
