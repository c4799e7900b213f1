"""Budgets that hold across sub-agents: a child starts with at most what its parent has
left, what it spends counts in its parent's usage and budgets however it ends, and a money
budget (tokens priced per model) ends a run like any other budget."""

from __future__ import annotations

import re

import pytest

from keel.activities.registry import Agent
from keel.testing import RuleSet
from keel.workflows.budgets import price_of, priced
from keel.workflows.models import AgentStatus, Limits, ModelPrice, RunState, Usage
from tests.agents import add, nap
from tests.conftest import Harness, wait_for
from tests.rules import TEST_RULES
from tests.test_cli import keel

INSTRUCTIONS = "You help with arithmetic."
# the child would go on adding for 50 steps, far past any budget its parent has
LOOPER = Agent(
    name="looper",
    instructions=INSTRUCTIONS,
    tools=[add],
    limits=Limits(max_steps=50, max_tokens=10_000_000),
)
TOKEN_BOSS = Agent(
    name="token-boss",
    instructions=INSTRUCTIONS,
    tools=[LOOPER.as_tool("ask_looper")],
    limits=Limits(max_tokens=3_000),
)
# a dollar per thousand tokens: a step of the scripted model costs about a tenth
PRICES = {"scripted": ModelPrice(input=1_000.0, output=1_000.0)}
MONEY_BOSS = Agent(
    name="money-boss",
    instructions=INSTRUCTIONS,
    tools=[LOOPER.as_tool("ask_looper")],
    limits=Limits(max_cost=1.0, prices=PRICES),
)
SPENDER = Agent(
    name="spender",
    instructions=INSTRUCTIONS,
    tools=[add],
    limits=Limits(max_steps=50, max_cost=0.5, prices=PRICES),
)
# a child whose call an interrupt cancels (it changes nothing, so it is interruptible)
NAPPER = Agent(name="napper", instructions=INSTRUCTIONS, tools=[nap])
NAP_BOSS = Agent(name="nap-boss", instructions=INSTRUCTIONS, tools=[NAPPER.as_tool("ask_napper")])
BUDGET_RULES = [
    {
        "name": "spin",
        "when": {"last_role": "user", "last_user": "(?i)^spin (?P<task>.+)$"},
        "reply": {"tool_calls": [{"name": "ask_looper", "arguments": {"task": "{task}"}}]},
    },
    {
        "name": "ask napper",
        "when": {"last_role": "user", "last_user": "(?i)^ask napper to (?P<task>.+)$"},
        "reply": {"tool_calls": [{"name": "ask_napper", "arguments": {"task": "{task}"}}]},
    },
    {
        "name": "doze",
        "when": {"last_role": "user", "last_user": "(?i)^doze$"},
        "reply": {"tool_calls": [{"name": "nap", "arguments": {"seconds": 600}}]},
    },
    {
        "name": "wheel",
        "when": {"any_user": "(?i)^wheel$"},
        "reply": {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},
    },
]


@pytest.fixture
def budgets(harness: Harness) -> Harness:
    rules = {**TEST_RULES, "rules": [*BUDGET_RULES, *TEST_RULES["rules"]]}
    harness.model.set_rules(RuleSet.from_dict(rules))
    return harness


def child_of(parent: RunState, run: str) -> str:
    """The run id of the sub-agent the parent's first step started (`subagent_run_id`)."""
    return f"{run}.looper-{parent.run_key[:8]}-1-0"


async def test_a_child_is_capped_by_what_its_parent_has_left(budgets: Harness) -> None:
    h = budgets
    async with h.running([TOKEN_BOSS]):
        run = await h.start("token-boss", "spin wheel")
        result = await h.agents.result(run, timeout=120)
        parent = await h.agents.get_state(run)
        child = await h.agents.get_state(child_of(parent, run))
        code, out, err = await keel(h, "status", run)
    assert code == 0, err
    # the child stopped at its parent's budget, not at its own (10 million tokens, 50 steps)
    assert child.status == AgentStatus.BUDGET_EXHAUSTED
    spent = re.match(r"token budget spent: (\d+) of (\d+) tokens", child.error or "")
    assert spent, child.error
    own_first_step = parent.usage.total_tokens - child.usage.total_tokens
    assert int(spent.group(2)) == 3_000 - own_first_step
    assert 1 < child.step < 50
    # the parent counts what the child spent, and its own budget ends it too
    assert parent.subagents.total_tokens == child.usage.total_tokens
    assert parent.subagents.steps == child.step
    assert parent.usage.total_tokens >= 3_000
    assert result.status == parent.status == AgentStatus.BUDGET_EXHAUSTED
    assert "token budget spent" in (parent.error or "")
    assert "by sub-agents" in (parent.error or "")
    assert result.usage.total_tokens == parent.usage.total_tokens
    assert result.usage.steps == parent.step + child.step
    # `keel status` shows the rolled-up usage and the sub-agents' part
    assert f"{parent.usage.total_tokens} tokens" in out
    assert f"({child.usage.total_tokens} by sub-agents, {child.step} steps)" in out


async def test_a_money_budget_ends_a_run(budgets: Harness) -> None:
    h = budgets
    async with h.running([SPENDER]):
        run = await h.start("spender", "wheel")
        result = await h.agents.result(run, timeout=120)
        state = await h.agents.get_state(run)
        code, out, err = await keel(h, "status", run)
    assert code == 0, err
    assert result.status == state.status == AgentStatus.BUDGET_EXHAUSTED
    assert (state.error or "").startswith("money budget spent: ")
    assert state.usage.cost >= 0.5
    # the price: a thousand per million tokens, input and output alike
    assert state.usage.cost == pytest.approx(state.usage.total_tokens / 1_000)
    assert 1 < state.step < 50
    assert f"cost {state.usage.cost:.4f}" in out


async def test_a_childs_cost_counts_in_its_parents_money_budget(budgets: Harness) -> None:
    h = budgets
    async with h.running([MONEY_BOSS]):
        run = await h.start("money-boss", "spin wheel")
        await h.agents.result(run, timeout=120)
        parent = await h.agents.get_state(run)
        child = await h.agents.get_state(child_of(parent, run))
    # the child has no prices of its own: it counts at its parent's, up to what was left
    assert child.status == AgentStatus.BUDGET_EXHAUSTED
    assert (child.error or "").startswith("money budget spent: ")
    assert child.usage.cost > 0
    assert parent.subagents.cost == pytest.approx(child.usage.cost)
    assert parent.status == AgentStatus.BUDGET_EXHAUSTED
    assert (parent.error or "").startswith("money budget spent: ")
    assert parent.usage.cost >= 1.0


async def test_a_cancelled_childs_usage_counts_in_its_parents(budgets: Harness) -> None:
    h = budgets
    async with h.running([NAP_BOSS]):
        run = await h.start("nap-boss", "ask napper to doze")

        async def napping() -> RunState | None:
            parent = await h.agents.get_state(run)
            if not parent.run_key:
                return None
            try:
                child = await h.agents.get_state(f"{run}.napper-{parent.run_key[:8]}-1-0")
            except Exception:
                return None  # not started yet
            # its spec may not be loaded yet: an empty transcript
            return child if child.transcript and child.transcript[-1].tool_calls else None

        child = await wait_for(napping)
        # an interrupt cancels the sub-agent's call, and so the sub-agent
        await h.agents.send_message(run, "never mind", "interrupt")
        parent = await wait_for(lambda: _with_subagents(h, run))
        cancelled = await h.agents.get_state(f"{run}.napper-{parent.run_key[:8]}-1-0")
    assert cancelled.status == AgentStatus.CANCELLED
    assert cancelled.usage.total_tokens == child.usage.total_tokens > 0
    assert parent.subagents.total_tokens == cancelled.usage.total_tokens
    assert parent.subagents.steps == cancelled.step == 1


async def _with_subagents(h: Harness, run: str) -> RunState | None:
    state = await h.agents.get_state(run)
    return state if state.subagents.total_tokens else None


def test_a_price_is_found_by_name_or_by_the_longest_prefix() -> None:
    big, small = ModelPrice(input=2.5, output=10.0), ModelPrice(input=0.15, output=0.6)
    prices = {"gpt-4o": big, "gpt-4o-mini": small}
    assert price_of(prices, "gpt-4o", "gpt-4o-mini-2024-07-18") is big  # as configured first
    assert price_of(prices, "", "gpt-4o-mini-2024-07-18") is small
    assert price_of(prices, "", "o3") is None
    usage = priced(Usage(prompt_tokens=1_000_000, completion_tokens=500_000), prices, "gpt-4o")
    assert usage.cost == pytest.approx(2.5 + 5.0)
