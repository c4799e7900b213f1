"""A name that is no tool of the agent is refused where it is written: a misspelt approval
key or policy entry would otherwise take the approval (or the tool) away unnoticed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from keel.activities.registry import Agent, AgentDefinitionError, AgentRegistry
from keel.config import SettingsError
from keel.plugin import KeelPlugin
from keel.workflows.models import ApprovalMode, ApprovalPolicy
from tests.agents import INSTRUCTIONS, TEST_AGENTS, add, charge
from tests.conftest import Harness
from tests.policies import make_policy, policy_data
from tests.test_cli import keel

ALWAYS = ApprovalPolicy(mode=ApprovalMode.ALWAYS, reason="a person looks first")


def test_an_approval_for_no_tool_of_the_agent_is_refused() -> None:
    with pytest.raises(AgentDefinitionError) as refused:
        Agent(
            name="reporter",
            instructions=INSTRUCTIONS,
            tools=[add, charge],
            approvals={"chrage": ALWAYS},
        )
    assert str(refused.value) == (
        "agent 'reporter': approvals names chrage, which is not one of its tools (add, charge)"
    )
    with pytest.raises(AgentDefinitionError, match="two of its tools are named 'add'"):
        Agent(name="twice", instructions=INSTRUCTIONS, tools=[add, add])
    # changed after it was made: the worker's registry looks again
    agent = Agent(name="reporter", instructions=INSTRUCTIONS, tools=[charge])
    agent.approvals["chrage"] = ALWAYS
    with pytest.raises(AgentDefinitionError, match="approvals names chrage"):
        AgentRegistry([agent])
    with pytest.raises(SettingsError, match="approvals names chrage"):
        KeelPlugin([agent])


def test_a_policy_naming_no_tool_of_the_agents_served_is_refused_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # tests.policies' roles name only agents served here: the policy is this worker's own
    typo = make_policy(tools={"chrage": {"approvers": ["approver"]}})
    with pytest.raises(SettingsError) as refused:
        KeelPlugin(TEST_AGENTS, policy=typo)
    message = str(refused.value)
    assert message.startswith("policy: tools names chrage, which no agent served here has")
    assert "charge" in message and "add" in message  # the tools there are
    with pytest.raises(SettingsError, match="agents.calc.tools names ad, which agent 'calc'"):
        KeelPlugin(TEST_AGENTS, policy=make_policy(agents={"calc": {"tools": ["ad"]}}))
    # a policy that also names agents served elsewhere may name their tools: a warning
    shared = policy_data(tools={"file_report": {"approvers": ["approver"]}})
    shared["roles"]["customer"]["agents"].append("reporter")
    with caplog.at_level(logging.WARNING, logger="keel.worker"):
        KeelPlugin(TEST_AGENTS, policy=make_policy(**shared))
    assert "tools names file_report, which no agent served here has" in caplog.text
    assert "served elsewhere (reporter)" in caplog.text


async def test_keel_worker_refuses_a_misspelt_name_before_it_serves(
    harness: Harness, tmp_path: Path
) -> None:
    (tmp_path / "typo_agents.py").write_text(
        "from keel import Agent, ApprovalMode, ApprovalPolicy\n"
        "from tests.agents import charge\n"
        "def make():\n"
        "    return [Agent(name='refunds', instructions='Refund.', tools=[charge],\n"
        "        approvals={'chrage': ApprovalPolicy(mode=ApprovalMode.ALWAYS)})]\n"
    )
    (tmp_path / "typo_module.py").write_text("from typo_agents import make\nAGENTS = make()\n")
    env = {"PYTHONPATH": str(Path.cwd())}
    for ref in ("typo_module:AGENTS", "typo_agents:make"):  # made on import, or by a function
        code, _, err = await keel(harness, "worker", "--agents", ref, env=env, cwd=tmp_path)
        assert code == 1 and "Traceback" not in err, err
        assert "approvals names chrage, which is not one of its tools (charge)" in err
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(policy_data(tools={"chrage": {"approvers": ["approver"]}})))
    code, _, err = await keel(
        harness,
        "worker",
        "--agents",
        "tests.agents:TEST_AGENTS",
        env={"KEEL_POLICY": str(policy)},
    )
    assert code == 1 and "Traceback" not in err, err
    assert "keel: policy: tools names chrage, which no agent served here has" in err
