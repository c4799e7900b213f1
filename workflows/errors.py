"""Domain error types: stable `type` strings, and the failures that end a run."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from keel.workflows.models import AgentStatus

# Stable ApplicationError types (they appear in histories and in clients' error handling).
AGENT_NOT_FOUND = "AgentNotFound"
PROVIDER_REJECTED = "ProviderRejected"  # 4xx other than 408/409/429: retrying cannot help
PROVIDER_UNAVAILABLE = "ProviderUnavailable"  # 408/409/429/5xx, connection errors: retried
PROVIDER_BAD_RESPONSE = "ProviderBadResponse"  # a body that is not a completion: retried
PROVIDER_AUTH = "ProviderAuth"  # 401/403: a key to fix; the run waits, `keel resume` after
MODEL_UNAVAILABLE = "ModelUnavailable"  # 404, no such model: a fallback may answer
CONTEXT_TOO_LONG = "ContextTooLong"  # the request exceeds the model's context: a fallback may
PAYLOAD_TOO_LARGE = "PayloadTooLarge"
KEEL_INTERNAL = "KeelInternalError"  # a bug in Keel's own code: never the provider's fault
BUDGET_EXHAUSTED = "BudgetExhausted"  # a run's budget is spent: it ends, not a success
RUN_CANCELLED = "RunCancelled"  # an approval expired under the agent's "cancel" policy
EMPTY_REPLY = "EmptyReply"  # the model answered with nothing, even after being told so
# a model request refers to stored conversation the worker cannot find: sent again whole
TRANSCRIPT_MISSING = "TranscriptMissing"

# What the run does when a model call's retries are spent, by failure type:
WAIT_AND_RETRY = {PROVIDER_UNAVAILABLE, PROVIDER_BAD_RESPONSE, PROVIDER_AUTH}
FALLBACK = {PROVIDER_UNAVAILABLE, MODEL_UNAVAILABLE, CONTEXT_TOO_LONG}


class KeelError(ApplicationError):
    """A deterministic failure of the agent loop itself; it fails the run with a message."""

    def __init__(self, message: str, *, type: str = "KeelError") -> None:
        super().__init__(message, type=type, non_retryable=True)


class EndRun(Exception):
    """Raised inside a loop to end the run with this status (a budget is spent, an expired
    approval's policy cancels the run); `execute` turns it into the run's result."""

    def __init__(self, status: AgentStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Registered as the worker's workflow_failure_exception_types: a bug fails the run, clearly,
# instead of retrying a workflow task forever.
WORKFLOW_FAILURE_TYPES: list[type[BaseException]] = [KeelError]
