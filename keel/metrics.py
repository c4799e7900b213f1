"""Prometheus metrics: Temporal's own SDK metrics and Keel's, on one endpoint.

`KEEL_METRICS_PORT` (on `keel worker`; `keel dev` defaults it to 9464) makes the process's
Temporal runtime serve `http://KEEL_METRICS_HOST:PORT/metrics`. Keel records its metrics
through Temporal's metric meters (`workflow.metric_meter()` skips replays, so a metric is
counted once however often a run is replayed), so they come out on the same endpoint:

| metric | type | labels | what |
|---|---|---|---|
| `keel_runs_ended` | counter | agent, status | runs that ended, by how |
| `keel_model_steps` | counter | agent | model steps taken |
| `keel_model_requests` | counter | agent, model, outcome | model calls (`ok` or the error kind) |
| `keel_model_latency` | histogram (ms) | agent, model | a model call, from request to reply |
| `keel_model_tokens` | counter | agent, model, kind | tokens used (`prompt`, `completion`) |
| `keel_tool_calls` | counter | agent, tool, outcome | tool calls (`ok`, or `raised`: retried by its policy) |
| `keel_tool_latency` | histogram (ms) | agent, tool | a tool call's duration |
| `keel_approval_wait` | histogram (ms) | agent, tool, outcome | request to decision |
| `keel_runs` | gauge | status | runs open now, by status (a visibility count) |

The SDK's own (`temporal_workflow_task_execution_latency`, `temporal_activity_execution_failed`,
`temporal_worker_task_slots_available`, ...) are listed in Temporal's documentation.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from keel.config import core_logging
from keel.workflows.models import AGENT_STATUS, AgentStatus

log = logging.getLogger("keel.metrics")
_RUNTIMES: dict[str, Runtime] = {}  # one per address: a port can be bound once
GAUGE_EVERY_SECONDS = 15.0
OPEN_STATUSES = [
    AgentStatus.RUNNING,
    AgentStatus.WAITING_APPROVAL,
    AgentStatus.WAITING_PROVIDER,
    AgentStatus.IDLE,
]


def prometheus_runtime(host: str, port: int) -> Runtime:
    """The process's Temporal runtime, serving metrics at host:port (created once)."""
    address = f"{host}:{port}"
    runtime = _RUNTIMES.get(address)
    if runtime is None:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                logging=core_logging(),
                metrics=PrometheusConfig(bind_address=address, counters_total_suffix=True),
            )
        )
        _RUNTIMES[address] = runtime
        log.info("metrics on http://%s/metrics", address)
    return runtime


async def publish_run_counts(client: Client, every: float = GAUGE_EVERY_SECONDS) -> None:
    """Keep the `keel_runs{status}` gauge current from visibility (runs parked on a person
    or a provider are the queue an operator watches); runs until cancelled."""
    runtime = client.service_client.config.runtime or Runtime.default()
    gauge = runtime.metric_meter.create_gauge("keel_runs", "Keel runs open now, by status")
    while True:
        for status in OPEN_STATUSES:
            try:
                found = await client.count_workflows(
                    f"{AGENT_STATUS.name} = '{status.value}' AND ExecutionStatus = 'Running'"
                )
                gauge.set(found.count, {"status": status.value})
            except Exception as e:  # visibility down: keep the last value, say why once
                log.warning("counting runs for keel_runs failed: %s", e)
                break
        await asyncio.sleep(every)
