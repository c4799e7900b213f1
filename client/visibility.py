"""What a caller may see: the runs their policy lets them see, as a list query, and the same
rule for one run; and what status a run has, from its latest execution."""

from __future__ import annotations

from temporalio.client import WorkflowExecutionStatus

from keel.policy_file import PolicyError
from keel.workflows.authz import tenant_of, users_of_tenant, visibility
from keel.workflows.models import AgentStatus, Policy, Visibility


def quoted(value: str) -> str:
    """A value as a list query's string literal; PolicyError for one it cannot hold."""
    if "'" in value or "\\" in value:
        raise PolicyError(f"a user or tenant name cannot hold quotes or backslashes: {value!r}")
    return f"'{value}'"


def visibility_query(policy: Policy | None, user: str) -> str:
    """The list filter (` AND ...`) of the runs this user may see: their own; their
    tenant's, or every run, as their roles' `sees` says. Without a policy: their own."""
    seen = visibility(policy, user) if policy is not None else Visibility.OWN
    if seen == Visibility.ALL:
        return ""
    tenant = tenant_of(policy, user)
    if seen == Visibility.TENANT and tenant and policy is not None:
        users = ", ".join(quoted(u) for u in sorted({user, *users_of_tenant(policy, tenant)}))
        return f" AND (AgentTenant = {quoted(tenant)} OR AgentUser IN ({users}))"
    return f" AND AgentUser = {quoted(user)}"


def may_see(policy: Policy | None, user: str, run_user: str, run_tenant: str) -> bool:
    """Whether this user may see a run of `run_user` in `run_tenant` (its AgentUser and
    AgentTenant): the rule `visibility_query` lists by, for one run."""
    seen = visibility(policy, user) if policy is not None else Visibility.OWN
    if seen == Visibility.ALL or run_user == user:
        return True
    tenant = tenant_of(policy, user)
    if seen == Visibility.TENANT and tenant and policy is not None:
        return run_tenant == tenant or run_user in users_of_tenant(policy, tenant)
    return False


# How a run stands is the latest execution of its workflow id, read from two sources that
# must agree: Temporal's execution status, and the AgentStatus the run itself upserted. A run
# closed where Keel could not say so (terminated, timed out, reset, a failure Keel did not
# see) keeps its last AgentStatus, so Temporal's status decides for every closed execution.
TERMINATED = "terminated"  # closed from outside Keel (`temporal workflow terminate`, a reset)
TIMED_OUT = "timed_out"  # its execution timeout passed
OPEN = (
    AgentStatus.RUNNING,
    AgentStatus.WAITING_APPROVAL,
    AgentStatus.WAITING_PROVIDER,
    AgentStatus.IDLE,
)
ENDED_BY_KEEL = (AgentStatus.FAILED, AgentStatus.BUDGET_EXHAUSTED, AgentStatus.CANCELLED)
RUN_STATUSES = [s.value for s in AgentStatus] + [TERMINATED, TIMED_OUT]
# one row per run: an execution that continued as new is a page of its run, not a run
NOT_CONTINUED = "ExecutionStatus != 'ContinuedAsNew'"


def run_status(agent_status: str, execution: WorkflowExecutionStatus | None) -> str:
    """The status of a run whose latest execution has this AgentStatus and this Temporal
    status: the AgentStatus while it runs; once closed, what Temporal says, in Keel's words
    (the AgentStatus where it names the same ending more precisely)."""
    E = WorkflowExecutionStatus
    if execution in (None, E.RUNNING):
        return agent_status or AgentStatus.RUNNING.value
    if execution == E.TERMINATED:
        return TERMINATED
    if execution == E.TIMED_OUT:
        return TIMED_OUT
    if execution == E.CANCELED:
        return AgentStatus.CANCELLED.value
    if execution == E.CONTINUED_AS_NEW:  # not a run's status: its next execution has it
        return agent_status or AgentStatus.RUNNING.value
    ended = {s.value for s in ENDED_BY_KEEL}
    if execution == E.COMPLETED:  # runs recorded before Keel failed its non-successes
        return agent_status if agent_status in ended else AgentStatus.COMPLETED.value
    return agent_status if agent_status in ended - {"failed"} else AgentStatus.FAILED.value


def status_query(status: str) -> str:
    """The list filter (` AND ...`) of the executions `run_status` calls `status`."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown status {status!r} (known: {', '.join(RUN_STATUSES)})")
    if status in {s.value for s in OPEN}:
        return f" AND ExecutionStatus = 'Running' AND AgentStatus = '{status}'"
    if status == TERMINATED:
        return " AND ExecutionStatus = 'Terminated'"
    if status == TIMED_OUT:
        return " AND ExecutionStatus = 'TimedOut'"
    closed = "ExecutionStatus IN ('Completed', 'Failed')"
    if status == AgentStatus.COMPLETED.value:
        return (
            " AND ExecutionStatus = 'Completed' AND (AgentStatus IS NULL OR AgentStatus NOT IN "
            "('failed', 'budget_exhausted', 'cancelled'))"
        )
    if status == AgentStatus.FAILED.value:
        return (
            " AND ((ExecutionStatus = 'Failed' AND (AgentStatus IS NULL OR AgentStatus NOT IN "
            "('budget_exhausted', 'cancelled'))) OR (ExecutionStatus = 'Completed' AND "
            "AgentStatus = 'failed'))"
        )
    if status == AgentStatus.CANCELLED.value:
        return f" AND (ExecutionStatus = 'Canceled' OR ({closed} AND AgentStatus = 'cancelled'))"
    return f" AND {closed} AND AgentStatus = '{status}'"  # budget_exhausted
