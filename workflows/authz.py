"""Who may do what: a run's policy, applied. Pure functions, no I/O and no clock.

The workflow calls them with its spec snapshot (which holds the policy the run started with),
so the same input gives the same answer on replay: who may start an agent, which tools it may
use, which limits hold, whose runs a user sees. Decisions on approvals are judged in
`keel.workflows.decisions`; policy files are parsed in `keel.policy_file`.
"""

from __future__ import annotations

from collections.abc import Sequence

from keel.workflows.models import AgentSpec, Limits, Policy, ToolSpec, Visibility

START_REFUSED = "StartRefused"  # the ApplicationError type of a run its user may not start
_VISIBILITY_ORDER = [Visibility.OWN, Visibility.TENANT, Visibility.ALL]


def policy_label(policy: Policy) -> str:
    """How refusals name a policy: its id, and the start of its digest."""
    short = policy.digest[:12]
    return f"{policy.id} ({short})" if policy.id else short or "(unnamed)"


# --- who a user is ------------------------------------------------------------------------------


def roles_of(policy: Policy, user: str) -> list[str]:
    """The user's roles (the policy's `default_roles` for a user it does not name)."""
    entry = policy.users.get(user)
    return list(entry.roles) if entry is not None else list(policy.default_roles)


def tenant_of(policy: Policy | None, user: str) -> str:
    """The user's tenant ('' when none)."""
    entry = policy.users.get(user) if policy is not None else None
    return entry.tenant if entry is not None else ""


def users_of_tenant(policy: Policy, tenant: str) -> list[str]:
    """The users the policy puts in this tenant."""
    return sorted(n for n, u in policy.users.items() if tenant and u.tenant == tenant)


def visibility(policy: Policy, user: str) -> Visibility:
    """Whose runs the user may list: the widest of its roles' `sees`."""
    seen = [policy.roles[r].sees for r in roles_of(policy, user) if r in policy.roles]
    return max(seen, key=_VISIBILITY_ORDER.index, default=Visibility.OWN)


# --- starting a run, using a tool, budgets ------------------------------------------------------


def start_refusal(policy: Policy | None, agent: str, user: str) -> str:
    """Why this user may not start this agent ('' when they may). A policy without roles
    does not restrict starts."""
    if policy is None or not policy.roles:
        return ""
    roles = roles_of(policy, user)
    for r in roles:
        allowed = policy.roles[r].agents if r in policy.roles else []
        if agent in allowed or "*" in allowed:
            return ""
    who = f"user {user!r}" if user else "a run without a user"
    may = sorted(r for r, d in policy.roles.items() if agent in d.agents or "*" in d.agents)
    return (
        f"{who} may not start agent {agent!r}: policy {policy_label(policy)} gives "
        f"{'roles ' + ', '.join(roles) if roles else 'no role'}; the roles that may: "
        f"{', '.join(may) or 'none'}"
    )


def allowed_tools(policy: Policy | None, agent: str, tools: Sequence[ToolSpec]) -> list[ToolSpec]:
    """The agent's tools its policy allows (all of them when it names none for the agent)."""
    entry = policy.agents.get(agent) if policy is not None else None
    if entry is None or entry.tools is None:
        return list(tools)
    return [t for t in tools if t.name in entry.tools]


def tool_refusal(spec: AgentSpec, tool: str) -> str:
    """Why the run's policy does not let this agent call this tool ('' when it does)."""
    policy = spec.policy
    entry = policy.agents.get(spec.name) if policy is not None else None
    if policy is None or entry is None or entry.tools is None or tool in entry.tools:
        return ""
    return (
        f"the tool {tool!r} is not allowed for agent {spec.name!r} by policy "
        f"{policy_label(policy)} (allowed: {', '.join(entry.tools) or 'none'}); "
        "it was not run"
    )


def effective_limits(spec: AgentSpec, user: str) -> Limits:
    """The agent's limits, lowered by the user's roles' (the most generous role counts; a
    role without a limit leaves the agent's)."""
    policy = spec.policy
    if policy is None:
        return spec.limits
    roles = [policy.roles[r] for r in roles_of(policy, user) if r in policy.roles]
    limits = spec.limits
    steps = [r.max_steps for r in roles if r.max_steps is not None]
    if roles and len(steps) == len(roles):
        limits = limits.model_copy(update={"max_steps": min(limits.max_steps, max(steps))})
    tokens = [r.max_tokens for r in roles if r.max_tokens is not None]
    if roles and len(tokens) == len(roles):
        limits = limits.model_copy(update={"max_tokens": min(limits.max_tokens, max(tokens))})
    return limits
