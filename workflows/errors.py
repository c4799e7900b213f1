"""Domain error types: stable `type` strings, and the failures that end a run."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

# Stable ApplicationError types (they appear in histories and in clients' error handling).
AGENT_NOT_FOUND = "AgentNotFound"
PROVIDER_REJECTED = "ProviderRejected"  # 4xx other than 408/409/429: retrying cannot help
PROVIDER_UNAVAILABLE = "ProviderUnavailable"  # 408/409/429/5xx, connection errors: retried
PROVIDER_BAD_RESPONSE = "ProviderBadResponse"  # a body that is not a completion: retried
PAYLOAD_TOO_LARGE = "PayloadTooLarge"


class KeelError(ApplicationError):
    """A deterministic failure of the agent loop itself; it fails the run with a message."""

    def __init__(self, message: str, *, type: str = "KeelError") -> None:
        super().__init__(message, type=type, non_retryable=True)


# Registered as the worker's workflow_failure_exception_types: a bug fails the run, clearly,
# instead of retrying a workflow task forever.
WORKFLOW_FAILURE_TYPES: list[type[BaseException]] = [KeelError]
