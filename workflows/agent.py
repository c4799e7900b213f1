"""AgentWorkflow: the default agent loop, built from the blocks in `KeelWorkflow`."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.workflows.base import KeelWorkflow
    from keel.workflows.models import (
        WORKFLOW_TYPE,
        AgentInput,
        AgentResult,
        AgentSpec,
        AgentStatus,
    )


@workflow.defn(name=WORKFLOW_TYPE)
class AgentWorkflow(KeelWorkflow):
    """Runs one agent conversation: turns of model and tool steps until the model answers;
    an agent that keeps its conversation open then goes idle and waits for the next message."""

    @workflow.run
    async def run(self, input: AgentInput) -> AgentResult:
        return await self.execute(input, self._loop)

    async def _loop(self, spec: AgentSpec) -> AgentResult:
        while True:
            await self.turn()
            if spec.keep_open_seconds <= 0 or not await self._idle(spec):
                return self.finish(AgentStatus.COMPLETED)

    async def _idle(self, spec: AgentSpec) -> bool:
        """Wait for the next message; False when the conversation timed out."""
        st = self.state
        st.status = AgentStatus.IDLE
        self.publish()
        now = workflow.now()
        if st.idle_since is None:
            st.idle_since = now
        left = spec.keep_open_seconds - (now - st.idle_since).total_seconds()
        try:
            await workflow.wait_condition(
                lambda: self.inbox.has_messages or workflow.info().is_continue_as_new_suggested(),
                timeout=timedelta(seconds=max(left, 0.001)),
                timeout_summary="idle: the conversation closes",
            )
        except TimeoutError:
            # a message that came with the timer in the same task is still delivered
            if not self.inbox.has_messages:
                return False
        if not self.inbox.has_messages:  # refused input filled the history: start afresh
            await self.continue_as_new()  # (idle_since is carried: the window goes on)
        st.paused_seconds += (workflow.now() - st.idle_since).total_seconds()
        st.idle_since = None
        st.status = AgentStatus.RUNNING
        return True
