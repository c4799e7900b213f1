"""Budgets that hold across sub-agents, and money (pure functions, no I/O).

A run's budget covers everything done on its behalf: its own model calls and those of its
sub-agents, whose usage is rolled up into the parent's when each child returns (completed,
failed, cancelled or out of budget). A child starts with at most what its parent has left
(`Budget`, passed in its `AgentInput`); its own limits apply too, and the tighter wins. A
parent can therefore never spend more through its children than it may spend itself, save
for the last step of a child that crosses the line (budgets are checked before each step).

Tokens become money through `Limits.prices` (per million input and output tokens, per model
name); `Limits.max_cost` is a budget like the others, and a child counts the price list of
its parent where its own names no price.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from keel.workflows.authz import effective_limits
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    Budget,
    Limits,
    ModelPrice,
    RunState,
    SubagentUsage,
    Usage,
)
from keel.workflows.policy import time_exhausted, time_left


def limits_of(spec: AgentSpec, state: AgentState) -> Limits:
    """The limits the run keeps: the agent's, lowered by the user's roles and by what its
    parent had left when it started (a sub-agent)."""
    limits = effective_limits(spec, state.user)
    b = state.budget
    if b is None:
        return limits
    cost = [c for c in (limits.max_cost, b.max_cost) if c is not None]
    return limits.model_copy(
        update={
            "max_steps": min(limits.max_steps, b.max_steps)
            if b.max_steps is not None
            else limits.max_steps,
            "max_tokens": min(limits.max_tokens, b.max_tokens)
            if b.max_tokens is not None
            else limits.max_tokens,
            "max_cost": min(cost) if cost else None,
            "prices": {**b.prices, **limits.prices},
        }
    )


def steps_taken(state: RunState) -> int:
    """Model steps taken for the run: its own and its sub-agents'."""
    return state.step + state.subagents.steps


def budget_exhausted(spec: AgentSpec, state: AgentState, now: datetime) -> str:
    """Which budget is spent before the next model step ('' when none is)."""
    limits = limits_of(spec, state)
    sub = state.subagents
    steps = steps_taken(state)
    if steps >= limits.max_steps:
        by = f", {sub.steps} of them by sub-agents" if sub.steps else ""
        return f"step budget spent: {steps} of {limits.max_steps} model steps{by}"
    if state.usage.total_tokens >= limits.max_tokens:
        by = f", {sub.total_tokens} of them by sub-agents" if sub.total_tokens else ""
        return f"token budget spent: {state.usage.total_tokens} of {limits.max_tokens} tokens{by}"
    if limits.max_cost is not None and state.usage.cost >= limits.max_cost:
        by = f", {sub.cost:.4f} of it by sub-agents" if sub.cost else ""
        return f"money budget spent: {state.usage.cost:.4f} of {limits.max_cost:.4f}{by}"
    deadline = state.budget.deadline if state.budget else None
    if deadline is not None and now >= deadline:
        return f"time budget spent: the parent run's working time ran out at {deadline:%H:%M:%S}"
    return time_exhausted(spec, state, now)


def budget_left(spec: AgentSpec, state: AgentState, now: datetime) -> Budget:
    """What the run has left now: the most a sub-agent it starts may spend."""
    limits = limits_of(spec, state)
    deadline = now + timedelta(seconds=max(time_left(spec, state, now), 0.0))
    return Budget(
        max_steps=max(limits.max_steps - steps_taken(state), 0),
        max_tokens=max(limits.max_tokens - state.usage.total_tokens, 0),
        max_cost=None if limits.max_cost is None else max(limits.max_cost - state.usage.cost, 0),
        deadline=deadline,
        prices=limits.prices,
    )


def price_of(prices: dict[str, ModelPrice], *names: str) -> ModelPrice | None:
    """The price of the first of `names` the list knows, by exact name, else by the longest
    priced name one of them starts with (a provider answers `gpt-4o` as `gpt-4o-2024-08-06`)."""
    for n in names:
        if n and n in prices:
            return prices[n]
    for n in names:
        found = sorted((k for k in prices if k and n.startswith(k)), key=len, reverse=True)
        if found:
            return prices[found[0]]
    return None


def priced(usage: Usage, prices: dict[str, ModelPrice], *models: str) -> Usage:
    """`usage` with its cost, at the price of the model that answered."""
    price = price_of(prices, *models)
    if price is None:
        return usage
    cost = (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / 1e6
    return usage.model_copy(update={"cost": usage.cost + cost})


def roll_up(state: AgentState, child: Usage) -> None:
    """Count a sub-agent's usage (tokens, cost and its steps) in the run's own."""
    state.usage = state.usage.add(child.model_copy(update={"steps": 0}))
    state.subagents = state.subagents.add(child)


def count_report(state: AgentState, run_id: str, report: SubagentUsage) -> str:
    """Roll up what a cancelled sub-agent reports it spent; the refusal ('' when counted).
    Only this run's children report (their ids extend its own: `subagent_run_id`)."""
    if not report.run_id.startswith(run_id + "."):
        return f"{report.run_id!r} is not a sub-agent of this run"
    roll_up(state, report.usage)
    return ""


def run_usage(state: RunState) -> Usage:
    """What a run answers its caller with: all its usage, and all the steps taken for it."""
    return state.usage.model_copy(update={"steps": steps_taken(state)})


def usage_line(usage: Usage, subagents: Usage) -> str:
    """Tokens (and cost), with the sub-agents' part: `1200 tokens (300 by sub-agents, 4
    steps)`."""
    text = f"{usage.total_tokens} tokens"
    if usage.cost:
        text += f" · cost {usage.cost:.4f}"
    if subagents.total_tokens or subagents.steps:
        text += f" ({subagents.total_tokens} by sub-agents, {subagents.steps} steps)"
    return text
