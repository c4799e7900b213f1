"""Keel as a package: one namespace, light workflow imports, a README that is true."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_type_hints

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import keel
from keel.config import Settings, SettingsError
from keel.plugin import build_worker
from keel.worker import load_agents, load_resources, load_workflows
from tests.sandbox_probe import SandboxImports
from tests.test_cli import keel as keel_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.filterwarnings("ignore:Module .* was imported after initial workflow load")
async def test_workflow_code_in_the_sandbox_imports_no_io_libraries(
    env: WorkflowEnvironment,
) -> None:
    """`import keel` loads the model client and HTTP eagerly; in a workflow's sandbox they
    must come from the host (KeelPlugin passes the `keel` package through), never be
    imported there again. Without that passthrough the same probe finds them."""
    settings = Settings(task_queue=f"tq-{uuid.uuid4().hex[:8]}")
    worker = build_worker(env.client, settings=settings, agents=[], workflows=[SandboxImports])
    async with worker:
        found = await _probe(env, settings.task_queue)
    assert found == []
    task_queue = f"tq-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=task_queue, workflows=[SandboxImports]):
        found = await _probe(env, task_queue)
    assert any(m.split(".")[0] in ("openai", "httpx") or "failed" in m for m in found), found


async def _probe(env: WorkflowEnvironment, task_queue: str) -> list[str]:
    return await env.client.execute_workflow(
        SandboxImports.run,
        id=f"probe-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue,
        execution_timeout=timedelta(minutes=1),
    )


# What a user calls: every public method of these classes (Temporal's handlers aside: a
# client reaches those by name, through AgentClient), and these functions. Settings' other
# methods are how KeelPlugin and keel.connect use it.
PUBLIC_CALLS: list[Any] = [
    keel.AgentClient,
    keel.Schedules,
    keel.KeelPlugin,
    keel.ModelProvider,
    keel.Agent,
    keel.Tool,
    keel.ToolContext,
    keel.KeelWorkflow,
    keel.tool,
    keel.sign_decision,
    keel.connect,
    keel.load_policy,
    keel.Settings.from_env,
]
# What a user builds those calls' inputs from or compares their results with, and the
# default loop (`loop=` of AgentClient.start, Temporal's typed handles).
PARTS = {"ApprovalMode", "Condition", "Decision", "EventKind", "AgentWorkflow", "ModelPrice"}
# the MCP toolsets an Agent takes (`toolsets=[...]`), and a secret by reference in them
PARTS |= {"MCPStdio", "MCPHttp", "Secret"}
# What those calls raise for a caller to catch (EndRun: what a loop raises to end its run).
ERRORS = {
    "KeelClientError",
    "NoWorker",
    "ScheduleError",
    "SettingsError",
    "PolicyError",
    "SecretError",
    "EndRun",
}
# Returned by a public call, yet internal (none: `get_state` answers with the public
# RunState, never the run's whole AgentState)
NOT_EXPORTED: set[str] = set()
# what Temporal's decorators set on a handler (an update's definition is its `_defn`)
HANDLER_MARKS = ("__temporal_query_definition", "__temporal_signal_definition", "_defn")


def test_the_public_api_is_what_public_calls_take_and_return() -> None:
    """One list: the public calls, every Keel type in their signatures, the parts and errors
    above; nothing internal, nothing missing, each name the object of its home module."""
    found = {t.__name__: t for c in PUBLIC_CALLS for t in _signature_types(c)}
    assert NOT_EXPORTED <= set(found)  # still returned: else drop it from NOT_EXPORTED
    calls = {c.__name__ for c in PUBLIC_CALLS} - {"from_env"}  # a method, of Settings
    wanted = calls | (set(found) - NOT_EXPORTED) | PARTS | ERRORS
    assert keel.__all__ == sorted(wanted)
    for name in keel.__all__:
        value = getattr(keel, name)
        assert found.get(name, value) is value
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value, f"keel.{name} is not {value.__module__}.{name}"
    for internal in (*NOT_EXPORTED, "AgentState", "AgentRegistry", "build_worker"):
        assert not hasattr(keel, internal)
    assert all(issubclass(getattr(keel, e), Exception) for e in ERRORS)


def _signature_types(obj: Any) -> set[type]:
    """The Keel types in the signatures of `obj` (a function, or a class's constructor,
    public methods and properties), out of unions, containers and callables."""
    calls: list[Any] = [obj]
    if inspect.isclass(obj):
        calls = [] if "__init__" in vars(obj) else [obj]  # a dataclass: its fields
        for name, member in vars(obj).items():
            member = getattr(member, "fget", getattr(member, "__func__", member))
            handler = any(hasattr(member, mark) for mark in HANDLER_MARKS)
            public = name == "__init__" or not name.startswith("_")
            if inspect.isfunction(member) and public and not handler:
                calls.append(member)
    out: set[type] = set()
    namespace = _namespace(sys.modules[obj.__module__])
    for call in calls:
        for hint in get_type_hints(call, namespace).values():
            _keel_types(hint, out)
    return out


def _namespace(module: ModuleType) -> dict[str, Any]:
    """The module's names, with those it imports only for type checkers."""
    ns = dict(vars(module))
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            exec(compile(ast.Module(node.body, []), module.__name__, "exec"), ns)
    return ns


def _keel_types(hint: Any, out: set[type]) -> None:
    if isinstance(hint, type) and hint.__module__.startswith("keel."):
        out.add(hint)
    for arg in get_args(hint):
        for a in arg if isinstance(arg, list) else [arg]:  # a Callable's parameters
            _keel_types(a, out)


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
