"""The `keel.load_fork` activity: read a run's record and cut it after a step, for a fork.

It runs in the worker, with the worker's Temporal client, so what a fork starts from is the
origin's own record, never a client's account of it."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.client.api import AgentClient, KeelClientError, NoWorker
from keel.client.visibility import may_see
from keel.config import Settings
from keel.workflows.authz import tenant_of
from keel.workflows.fork import FORK_REFUSED, ForkError, inherited, state_after
from keel.workflows.models import LOAD_FORK, TERMINAL_STATUSES, ForkInput, ForkState


def _refused(message: str) -> ApplicationError:
    return ApplicationError(message, type=FORK_REFUSED, non_retryable=True)


@activity.defn(name=LOAD_FORK)
async def load_fork(input: ForkInput) -> ForkState:
    """The origin's transcript, usage and effects after the step, checked: the origin is a
    run of the same agent, the user forking may see it, and the step has ended."""
    o = input.origin
    agents = AgentClient(activity.client(), Settings(), as_user="", policy=input.policy)
    try:
        st = await agents.get_state(o.run_id)
    except NoWorker:
        raise  # retried: a worker for the origin's task queue may be on its way
    except KeelClientError as e:
        raise _refused(f"run {o.run_id} cannot be read: {e}") from None
    if st.agent != input.agent:
        raise _refused(f"run {o.run_id} is a run of agent {st.agent!r}, not {input.agent!r}")
    tenant = tenant_of(input.policy, st.user)
    if not may_see(input.policy, input.user, st.user, tenant):
        who = f"user {input.user!r}" if input.user else "a run without a user"
        raise _refused(f"{who} may not see run {o.run_id}")
    if o.step > st.step:
        raise _refused(f"run {o.run_id} has made {st.step} step(s): fork after 1..{st.step}")
    try:
        transcript, usage = state_after(st.transcript, o.step, st.usage)
    except ForkError as e:
        if o.step == st.step and st.status not in TERMINAL_STATUSES:
            raise _refused(
                f"step {o.step} of run {o.run_id} has not finished (the run is "
                f"{st.status.value}): fork after an earlier step, or once it has"
            ) from None
        raise _refused(str(e)) from None
    return ForkState(
        transcript=transcript,
        usage=usage,
        # a fork of a fork inherits what its origin inherited, too
        effects=inherited([*st.inherited_effects, *st.effects], o.step, o.run_id),
        spec=st.spec,
    )
