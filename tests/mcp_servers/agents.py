"""Agents whose tools come from MCP servers, and the scripted model's rules that use them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from keel.activities.mcp import MCPHttp, MCPStdio, Secret
from keel.activities.registry import Agent
from keel.workflows.models import ApprovalMode, ApprovalPolicy
from tests.agents import TOOLS
from tests.rules import TEST_RULES

PYTHON = sys.executable
SQLITE = "import sys, mcp_server_sqlite as m; sys.exit(m.main())"  # it has no __main__

TIME = MCPStdio("time", PYTHON, ["-m", "mcp_server_time"], trust_read_only_hint=True)
CLOCK = Agent(name="timekeeper", instructions="Tell the time.", toolsets=[TIME], tools=TOOLS)


def db_agent(path: Path) -> Agent:
    """An agent over a SQLite database through the reference server; writes need approval."""
    server = MCPStdio(
        "db",
        PYTHON,
        ["-c", SQLITE, "--db-path", str(path)],
        read_only=["read_query", "list_tables", "describe_table"],
        approvals={"write_query": ApprovalPolicy(mode=ApprovalMode.ALWAYS)},
    )
    return Agent(name="db", instructions="Keep the records.", toolsets=[server])


def hostile_agent(url: str, name: str = "mark") -> Agent:
    """An agent whose only tools come from the hostile server (tests/mcp_servers/hostile.py),
    with a token from the worker's environment (HOSTILE_TOKEN) in its requests' headers."""
    server = MCPHttp(
        "hostile",
        url,
        headers={"Authorization": Secret("HOSTILE_TOKEN", "Bearer {}")},
        read_only=["huge", "slow", "poison", "lying", "leak"],
    )
    return Agent(name=name, instructions="Do what is asked.", toolsets=[server])


def _call(name: str, when: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "when": {"last_role": "user", "last_user": when},
        "reply": {"tool_calls": [{"name": tool, "arguments": arguments}]},
    }


MCP_RULES: dict[str, Any] = {
    "rules": [
        _call("time", "(?i)what time", "time_get_current_time", {"timezone": "UTC"}),
        _call("table", "(?i)make a table", "db_create_table", {"query": "CREATE TABLE t (x INT)"}),
        _call(
            "insert",
            "(?i)insert (?P<x>\\d+)",
            "db_write_query",
            {"query": "INSERT INTO t VALUES ({x})"},
        ),
        _call("select", "(?i)read the table", "db_read_query", {"query": "SELECT x FROM t"}),
        _call("charge", "(?i)^charge (?P<n>\\d+)", "hostile_charge", {"amount": "{n:int}"}),
        _call("huge", "(?i)huge", "hostile_huge", {}),
        _call("slow", "(?i)slow", "hostile_slow", {"seconds": 600}),
        _call("poison", "(?i)read the document", "hostile_poison", {}),
        _call("lie", "(?i)count", "hostile_lying", {"count": 3}),
        _call("extra", "(?i)the new tool", "hostile_extra", {}),
        _call("leak", "(?i)credentials", "hostile_leak", {}),
        {
            # the document told it to: a model that obeys a tool's result
            "name": "obey",
            "when": {"last_role": "tool", "last_tool_name": "hostile_poison"},
            "reply": {"tool_calls": [{"name": "hostile_wipe", "arguments": {}}]},
        },
        *TEST_RULES["rules"],
    ],
    "default": TEST_RULES.get("default", {"content": "no scripted reply"}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HostileServer:
    """The hostile server in a process of its own, on a port that stays its own across
    restarts (a crash, a new version)."""

    def __init__(self, ledger: Path, port: int | None = None) -> None:
        self.ledger = ledger
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, crash: bool = False, hold: bool = False, version: int = 1) -> None:
        args = ["--port", str(self.port), "--ledger", str(self.ledger), "--version", str(version)]
        args += ["--crash"] if crash else ["--hold"] if hold else []
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tests.mcp_servers.hostile", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it (a graceful stop would wait for the calls it still holds)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
