"""Keel: AI agents that run durably on Temporal.

    from keel import Agent, tool, ToolContext, KeelPlugin, AgentClient

Define tools and agents, add `KeelPlugin(agents=[...])` to your Temporal client (its workers
then serve them beside your own workflows), and start and steer runs with `AgentClient`.
Loops of your own subclass `KeelWorkflow`.

The names below are the public API: what you build agents from, every type a public call
takes or returns, and the errors those calls raise. Everything else under `keel` is
internal. Workflow code runs in Temporal's sandbox, through which `KeelPlugin` passes the
whole `keel` package: what this module imports (the model client, HTTP) is loaded once, by
the worker, and never inside the sandbox.
"""

import types as _types

from keel.activities.mcp import MCPHttp as MCPHttp
from keel.activities.mcp import MCPServer as MCPServer
from keel.activities.mcp import MCPStdio as MCPStdio
from keel.activities.mcp import Secret as Secret
from keel.activities.registry import Agent as Agent
from keel.activities.registry import load_policy as load_policy
from keel.activities.tools import SecretError as SecretError
from keel.activities.tools import Tool as Tool
from keel.activities.tools import ToolContext as ToolContext
from keel.activities.tools import tool as tool
from keel.client.api import AgentClient as AgentClient
from keel.client.api import KeelClientError as KeelClientError
from keel.client.api import NoWorker as NoWorker
from keel.client.api import PendingApproval as PendingApproval
from keel.client.api import RunSummary as RunSummary
from keel.client.record import RunRecord as RunRecord
from keel.client.schedules import ScheduleError as ScheduleError
from keel.client.schedules import ScheduleInfo as ScheduleInfo
from keel.client.schedules import Schedules as Schedules
from keel.client.signing import sign_decision as sign_decision
from keel.config import Settings as Settings
from keel.config import SettingsError as SettingsError
from keel.config import connect as connect
from keel.plugin import KeelPlugin as KeelPlugin
from keel.plugin import ModelProvider as ModelProvider
from keel.policy_file import PolicyError as PolicyError
from keel.workflows.agent import AgentWorkflow as AgentWorkflow
from keel.workflows.base import EndRun as EndRun
from keel.workflows.base import KeelWorkflow as KeelWorkflow
from keel.workflows.decisions import DecisionTarget as DecisionTarget
from keel.workflows.events import EventKind as EventKind
from keel.workflows.events import RunEvent as RunEvent
from keel.workflows.models import AgentInput as AgentInput
from keel.workflows.models import AgentResult as AgentResult
from keel.workflows.models import AgentSpec as AgentSpec
from keel.workflows.models import AgentStatus as AgentStatus
from keel.workflows.models import ApprovalMode as ApprovalMode
from keel.workflows.models import ApprovalPolicy as ApprovalPolicy
from keel.workflows.models import ApprovalTimeoutAction as ApprovalTimeoutAction
from keel.workflows.models import Compaction as Compaction
from keel.workflows.models import Condition as Condition
from keel.workflows.models import DecideInput as DecideInput
from keel.workflows.models import DecideReceipt as DecideReceipt
from keel.workflows.models import Decision as Decision
from keel.workflows.models import Limits as Limits
from keel.workflows.models import MessagePolicy as MessagePolicy
from keel.workflows.models import MessageReceipt as MessageReceipt
from keel.workflows.models import ModelPrice as ModelPrice
from keel.workflows.models import ModelResult as ModelResult
from keel.workflows.models import ModelSettings as ModelSettings
from keel.workflows.models import Policy as Policy
from keel.workflows.models import RunState as RunState
from keel.workflows.models import RunStatusView as RunStatusView
from keel.workflows.models import ToolSpec as ToolSpec
from keel.workflows.models import TranscriptSlice as TranscriptSlice

__version__ = "0.2.0"

# The imports above are the list: importing a submodule also sets it on this package, hence
# the filter.
__all__ = sorted(
    name
    for name, value in globals().items()
    if not name.startswith("_") and not isinstance(value, _types.ModuleType)
)
