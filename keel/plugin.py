"""KeelPlugin: Keel in any Temporal client and worker, beside a team's own workflows.

    client = await Client.connect("localhost:7233", plugins=[KeelPlugin(agents=AGENTS)])
    worker = Worker(client, task_queue="my-queue", workflows=[MyWorkflow])

adds Keel's workflows, activities (bound to these agents, their resources and the model),
the pydantic data converter (with payload storage and encryption when configured), the
sandbox passthrough Keel's workflow code needs, its failure types, and registers Keel's
search attributes when the worker starts. A worker encrypts with its client's converter, so
one whose client lacks the plugin's keys is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.plugin import SimplePlugin
from temporalio.service import RPCError
from temporalio.worker import ReplayerConfig, Worker, WorkerConfig, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from keel.activities import build_activities
from keel.activities.model import ModelActivities, shown_url
from keel.activities.registry import Agent, AgentDefinitionError, AgentRegistry, load_policy
from keel.codec import EncryptionCodec, keel_codec_of
from keel.config import Settings, SettingsError
from keel.policy_file import PolicyError
from keel.storage import transcript_store
from keel.tracing import check_provider
from keel.workflows import WORKFLOWS
from keel.workflows.errors import WORKFLOW_FAILURE_TYPES
from keel.workflows.models import SEARCH_ATTRIBUTES, Policy

log = logging.getLogger("keel.worker")

# Deterministic and stateless at module level, so the sandbox may share them with the host:
# Keel's own modules (its error types must be the same classes the worker registers), and
# the libraries its workflow code uses.
PASSTHROUGH_MODULES = ("keel", "pydantic", "pydantic_core", "jsonschema", "cryptography")
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
OPENAI_BASE_URL = "https://api.openai.com/v1"  # the openai client's, when none is set
# A dead worker's workflow tasks wait this long on its sticky queue before another worker
# takes them (the SDK's default is 10 s); a longer value set on the worker is kept. A live
# worker takes a task from its sticky queue in milliseconds; one that misses the window
# loses only its cache (another worker replays the run).
STICKY_TIMEOUT = timedelta(seconds=2)
SDK_DEFAULT_STICKY_TIMEOUT = timedelta(seconds=10)
# The SDK sends an activity's heartbeats at most every 80% of its heartbeat timeout (2 s of
# a 2.5 s one): on a busy worker, one late send and a live attempt is timed out and retried
# beside itself. Sending every half second leaves 2 s of slack.
HEARTBEAT_THROTTLE = timedelta(seconds=0.5)
SDK_DEFAULT_HEARTBEAT_THROTTLE = timedelta(seconds=60)


@dataclass(frozen=True)
class ModelProvider:
    """An OpenAI-compatible endpoint: OpenAI itself, vLLM, Ollama, llama.cpp, ...

    `base_url` None means OpenAI's; `model` is the name agents without their own use."""

    model: str = DEFAULT_OPENAI_MODEL
    base_url: str | None = None
    api_key: str | None = None

    @property
    def endpoint(self) -> str:
        """The model and where it is served, as a worker's start line names them (the key
        never)."""
        return f"{self.model} at {shown_url(self.base_url or OPENAI_BASE_URL)}"

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelProvider:
        """OPENAI_BASE_URL / OPENAI_API_KEY / KEEL_MODEL; with none set, the embedded
        default's scripted model."""
        if settings.uses_scripted_model:
            return cls(model="scripted", base_url=settings.scripted_model_url)
        model = settings.model if settings.model != "scripted" else DEFAULT_OPENAI_MODEL
        return cls(model=model, base_url=settings.openai_base_url, api_key=settings.openai_api_key)


class KeelPlugin(SimplePlugin):
    """Serve these agents (and their sub-agents) from any worker; see the module's docstring.

    Args:
        agents: the agents this worker serves.
        resources: what tools get as `ctx.resources` (a database, an HTTP client, ...).
        model: the default model: a name (endpoint from the environment) or a ModelProvider.
        settings: Keel's settings (default: from the environment).
        register_search_attributes: add Keel's search attributes when the worker starts,
            where the server allows it (not on Temporal Cloud: create them there yourself).
        policy: who may do what (default: the file KEEL_POLICY names; none: no policy).
    """

    def __init__(
        self,
        agents: Sequence[Agent] = (),
        *,
        resources: Any = None,
        model: str | ModelProvider | None = None,
        settings: Settings | None = None,
        register_search_attributes: bool = True,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        if policy is None and self.settings.policy_file:
            try:
                policy = load_policy(self.settings.policy_file)
            except PolicyError as e:
                raise SettingsError(f"KEEL_POLICY: {e}") from None
        provider = ModelProvider.from_settings(self.settings)
        if isinstance(model, str):
            provider = dataclasses.replace(provider, model=model)
        elif model is not None:
            provider = model
        self.provider = provider
        try:
            self.registry = AgentRegistry(
                list(agents),
                default_model=provider.model,
                payload_storage=self.settings.stores_payloads,
                task_queues=(self.settings.model_task_queue, self.settings.tool_task_queue),
                policy=policy,
            )
        except (PolicyError, AgentDefinitionError) as e:  # a name that is no tool of theirs
            raise SettingsError(str(e)) from None
        self.model_activities = ModelActivities(
            provider.base_url,
            provider.api_key,
            provider.model,
            calls_per_second=self.settings.model_calls_per_second,
            transcripts=transcript_store(self.settings),
        )
        self._register = register_search_attributes
        super().__init__(
            "keel.KeelPlugin",
            data_converter=self._data_converter,
            activities=build_activities(self.registry, self.model_activities, resources),
            workflows=WORKFLOWS,
            workflow_runner=_with_passthrough,
            workflow_failure_exception_types=WORKFLOW_FAILURE_TYPES,
        )

    @property
    def agents(self) -> list[str]:
        """The names of the agents served, sub-agents included."""
        return self.registry.names

    def _data_converter(self, existing: DataConverter | None) -> DataConverter:
        return self.settings.data_converter(existing)

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        """Add Keel to the worker; refuse a client that cannot carry Keel's payloads, a
        second KeelPlugin (one on the client and one on the worker, say), and a tracer
        provider that would export the spans of Keel's workflow code again on replay."""
        check_provider()
        if any(w in WORKFLOWS for w in config.get("workflows") or []):
            raise ValueError(
                "KeelPlugin is on this worker twice (its client already has one, or "
                "build_worker was given a client connected with KeelPlugin): keep one, and "
                "give it all the agents"
            )
        client = config.get("client")
        if client is not None:
            converter = client.data_converter
            if converter.payload_converter_class.__name__ != "PydanticPayloadConverter":
                raise ValueError(
                    "this worker's client does not use the pydantic data converter Keel's "
                    "payloads need: pass KeelPlugin to Client.connect(plugins=[...]) (or "
                    "connect with keel.connect) rather than to the Worker only"
                )
            self._check_encryption(converter)
        if config.get("sticky_queue_schedule_to_start_timeout") == SDK_DEFAULT_STICKY_TIMEOUT:
            config["sticky_queue_schedule_to_start_timeout"] = STICKY_TIMEOUT
        if config.get("max_heartbeat_throttle_interval") == SDK_DEFAULT_HEARTBEAT_THROTTLE:
            config["max_heartbeat_throttle_interval"] = HEARTBEAT_THROTTLE
        return super().configure_worker(config)

    def configure_replayer(self, config: ReplayerConfig) -> ReplayerConfig:
        """Add Keel to the replayer; refuse a tracer provider that is not replay-safe."""
        check_provider()
        return super().configure_replayer(config)

    def _check_encryption(self, converter: DataConverter) -> None:
        """A worker encrypts with its client's converter: refuse one whose client does not
        use the keys this plugin's settings name (it would write plain text, or use another
        key), rather than find out from a run's history."""
        keys = self.settings.key_ring()
        if keys is None:
            return
        codec = keel_codec_of(converter.payload_codec)
        have = codec.keys if isinstance(codec, EncryptionCodec) else None
        if have != keys:
            uses = (
                "does not encrypt payloads"
                if have is None
                else f"encrypts with keys {have.ids}"
                if have.ids != keys.ids
                else "has other keys under the same ids"
            )
            raise ValueError(
                f"KeelPlugin's settings encrypt with keys {keys.ids}, but this worker's client "
                f"{uses}: connect the client with the same settings (keel.connect(settings), "
                "or KeelPlugin on Client.connect) so the worker writes what clients can read"
            )

    async def run_worker(self, worker: Worker, next: Callable[[Worker], Awaitable[None]]) -> None:
        """Register Keel's search attributes (where allowed), then run the worker; when it
        stops, close the sessions of the agents' MCP servers."""
        if self._register:
            await ensure_search_attributes(worker.client)
        try:
            await super().run_worker(worker, next)
        finally:
            await self.registry.mcp.close()


def _with_passthrough(existing: WorkflowRunner | None) -> WorkflowRunner:
    """The worker's workflow runner, with Keel's modules passed through the sandbox."""
    if existing is None:
        return SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
        )
    if isinstance(existing, SandboxedWorkflowRunner):
        return dataclasses.replace(
            existing,
            restrictions=existing.restrictions.with_passthrough_modules(*PASSTHROUGH_MODULES),
        )
    return existing  # unsandboxed: nothing to pass through


async def ensure_search_attributes(client: Client) -> None:
    """Register Keel's search attributes where the server lets us (not on Temporal Cloud)."""
    try:
        have = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        existing = set(have.custom_attributes)
    except RPCError:
        existing = set()  # servers without the list call (the time-skipping test server)
    for key in SEARCH_ATTRIBUTES:
        if key.name in existing:
            continue
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=client.namespace,
                    search_attributes={key.name: int(key.indexed_value_type)},
                )
            )
        except RPCError as e:
            if "already" not in e.message.lower():
                # a managed cluster registers them through its own console
                log.warning("could not register search attribute %s: %s", key.name, e.message)


def build_worker(
    client: Client,
    *,
    settings: Settings,
    agents: Sequence[Agent],
    resources: Any = None,
    model: str | ModelProvider | None = None,
    workflows: Sequence[type] = (),
    activities: Sequence[Callable[..., Any]] = (),
    policy: Policy | None = None,
    **worker_options: Any,
) -> Worker:
    """A worker on the settings' task queue serving `agents`, beside any `workflows` and
    `activities` of the caller's own (under `policy`, or the one KEEL_POLICY names)."""
    plugin = KeelPlugin(agents, resources=resources, model=model, settings=settings, policy=policy)
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=list(workflows),
        activities=list(activities),
        plugins=[plugin],
        **worker_options,
    )
