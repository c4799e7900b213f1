"""Keel as a package: one namespace, light workflow imports, a README that is true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import keel
from keel.config import Settings, SettingsError
from keel.worker import load_agents, load_resources, load_workflows
from tests.test_cli import keel as keel_cli

ROOT = Path(__file__).resolve().parent.parent


def test_workflow_code_imports_no_io_libraries() -> None:
    """`import keel.workflows.agent` pulls in no model client, database or HTTP client."""
    code = (
        "import sys, keel.workflows.agent\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'httpx', 'aiohttp', 'sqlite3', '_sqlite3', 'keel.activities') "
        "or m.startswith(('keel.activities', 'keel.client', 'urllib.request', 'http.client')))\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_public_api_is_curated() -> None:
    assert {"Agent", "tool", "ToolContext", "AgentClient", "KeelPlugin", "KeelWorkflow"} <= set(
        keel.__all__
    )
    for name in keel.__all__:
        assert getattr(keel, name) is not None
    with pytest.raises(AttributeError):
        keel.build_worker  # noqa: B018 - internal, not exported


def test_agents_resources_and_workflows_load_by_module_attribute() -> None:
    agents = load_agents("examples.helpdesk.agents:AGENTS")
    assert [a.name for a in agents] == ["planner", "triage"]
    assert load_agents("examples.helpdesk.agents:TRIAGE")[0].name == "triage"
    assert [w.__name__ for w in load_workflows("examples.helpdesk.workflows:PlanAndExecute")] == [
        "PlanAndExecute"
    ]
    assert load_resources(None) is None
    for ref, message in [
        ("examples.helpdesk.agents", "module:attribute"),
        ("no_such_module_xyz:AGENTS", "cannot import"),
        ("examples.helpdesk.agents:NOPE", "has no 'NOPE'"),
        ("examples.helpdesk.agents:ARTICLES", "not an Agent"),
    ]:
        with pytest.raises(SettingsError, match=message):
            load_agents(ref)


def test_settings_come_from_temporals_environment_configuration(tmp_path: Path) -> None:
    s = Settings.from_env({"TEMPORAL_ADDRESS": "example:7233", "TEMPORAL_API_KEY": "k"})
    assert (s.address, s.temporal["api_key"], s.temporal["tls"]) == ("example:7233", "k", True)
    profile = tmp_path / "temporal.toml"
    profile.write_text('[profile.prod]\naddress = "prod:7233"\nnamespace = "agents"\n')
    s = Settings.from_env({"TEMPORAL_CONFIG_FILE": str(profile), "TEMPORAL_PROFILE": "prod"})
    assert (s.address, s.namespace) == ("prod:7233", "agents")
    with pytest.raises(SettingsError, match="KEEL_MODEL_PORT"):
        Settings.from_env({"KEEL_MODEL_PORT": "eighty"})


async def test_keel_worker_says_what_to_serve() -> None:
    code, _, err = await keel_cli(None, "worker")
    assert code == 1 and "--agents" in err and "Traceback" not in err
    code, _, err = await keel_cli(None, "worker", "--agents", "nope_xyz:AGENTS")
    assert code == 1 and "cannot import 'nope_xyz'" in err and "Traceback" not in err


def test_the_readme_shows_the_example_as_it_is() -> None:
    """Each code block the README quotes from examples/helpdesk is in those files verbatim."""
    readme = (ROOT / "README.md").read_text()
    files = (ROOT / "examples" / "helpdesk").glob("*.py")
    sources = [_code_lines(p.read_text()) for p in files]
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    quoted = [b for b in blocks if "examples/helpdesk" in readme[: readme.index(b)][-400:]]
    assert len(quoted) >= 3
    for block in quoted:
        for chunk in re.split(r"\n# \.\.\. [^\n]*\n", block):
            assert any(_code_lines(chunk) in src for src in sources), chunk[:200]


def _code_lines(text: str) -> str:
    """The code, line by line, without indentation, blank lines or comments."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#")) + "\n"


def test_empty_temporal_variables_are_unset_and_tls_off_means_off() -> None:
    """As compose passes them: TEMPORAL_TLS= and TEMPORAL_API_KEY= leave TLS off."""
    assert Settings.from_env({"TEMPORAL_TLS": "", "TEMPORAL_API_KEY": ""}).temporal == {}
    assert Settings.from_env({"TEMPORAL_TLS": "off"}).temporal == {"tls": False}
    with pytest.raises(SettingsError, match="nope.pem"):
        Settings.from_env({"TEMPORAL_TLS_SERVER_CA_CERT_PATH": "/nope.pem"})


def test_a_sub_agent_is_side_effecting_when_its_tools_are() -> None:
    from tests.agents import BOSS, CALC, INSTRUCTIONS, add

    by_name = {t.name: t.spec for t in BOSS.tools}
    assert by_name["ask_calc"].side_effects and not by_name["ask_calc"].interruptible
    assert by_name["ask_calc"].agent == "calc"
    reader = keel.Agent(name="reader", instructions=INSTRUCTIONS, tools=[add])
    assert not reader.as_tool().spec.side_effects
    assert CALC.as_tool(side_effects=False).spec.interruptible
    chat = keel.Agent(name="chatty", instructions=INSTRUCTIONS, keep_open_seconds=60)
    with pytest.raises(ValueError, match="keeps its conversation open"):
        chat.as_tool()


async def test_keel_plugin_twice_on_one_worker_is_refused_clearly(env) -> None:  # type: ignore[no-untyped-def]
    from temporalio.client import Client

    from keel.plugin import KeelPlugin, build_worker

    settings = Settings()
    client = await Client.connect(
        env.client.service_client.config.target_host, plugins=[KeelPlugin(settings=settings)]
    )
    with (
        pytest.warns(UserWarning, match="same plugin type"),  # the SDK's own hint
        pytest.raises(ValueError, match="KeelPlugin is on this worker twice"),
    ):
        build_worker(client, settings=settings, agents=[])
