"""The model's reply for a step: the agent's fallback models, the wait on a provider that is
down (`waiting_provider`, backing off, woken early by `keel resume`), and the reply shown as
it is written.

Streaming never touches what the run records: the activity sends batches of deltas
(`keel.model_stream`, each tagged with the call and its attempt) and still returns the whole
reply, which is what the transcript keeps and what replay reads. The deltas become
`model_delta` events for watchers; text a retried, replaced or interrupted call had written
is voided with a `model_discard` event, so a client never shows it as part of the answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import NoReturn

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

from keel.workflows import errors
from keel.workflows.errors import EndRun
from keel.workflows.events import EventKind, EventLog
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    AgentStatus,
    AuditEntry,
    AuditKind,
    ModelResult,
    ModelSettings,
    StreamBatch,
    ToolSpec,
)
from keel.workflows.policy import time_exhausted, time_left
from keel.workflows.steps import (
    AUTH_RETRY_SECONDS,
    failure_message,
    failure_retry_after,
    failure_type,
    model_step,
)
from keel.workflows.transcript_ref import TranscriptChain

BY_REFERENCE_PATCH = "keel.transcript-by-reference"  # model requests refer to stored context


class ModelCall:
    """Asks the model for a step's reply. A failure another model could survive (overloaded,
    context too long, model gone) goes to the next of the agent's fallbacks; a provider that
    is down, or a key that was refused, makes the run wait for as long as its time budget
    allows. Only a failure of the request itself ends the run."""

    def __init__(
        self,
        state: AgentState,
        events: EventLog,
        publish: Callable[[], None],
        fail: Callable[[str, str], NoReturn],
        continue_as_new: Callable[[], Awaitable[NoReturn]],
    ) -> None:
        self._state = state
        self._events = events
        self._publish = publish
        self._fail = fail
        self._continue_as_new = continue_as_new  # the step starts again in a new history
        self._resume = False  # an operator asked to try the provider again now
        self._calls = 0  # model calls made in this history: each streams under its own id
        self._flight = ""  # the stream id of the call in flight ("" when none)
        self._attempt = 0  # the latest attempt of that call heard from
        self._written = 0  # the attempt whose text watchers hold (0: none)
        self._chain: TranscriptChain | None = None  # the context by reference (storage on)
        self._chain_known = False  # whether the run sends it so (decided at its first call)
        # asked at the start of every history, where its marker is on replay too (asked at
        # a step instead, a replay can meet the marker in another activation than live)
        self._referable = workflow.patched(BY_REFERENCE_PATCH)

    def _by_reference(self, spec: AgentSpec) -> TranscriptChain | None:
        """The chain the requests refer to, when the worker stores payloads; runs recorded
        before requests went by reference replay sending them whole."""
        if not self._chain_known:
            self._chain_known = True
            if spec.payload_storage and self._referable:
                self._chain = TranscriptChain()
                self._chain.take_up(self._state.context_stored)
        return self._chain

    def on_stream(self, batch: StreamBatch) -> None:
        """Deltas of the call in flight become `model_delta` events. A batch of another call
        (one already answered, or of another history) or of an older attempt is ignored: it
        arrived late, and its text is void."""
        if not batch.stream_id or batch.stream_id != self._flight:
            return
        if batch.attempt < self._attempt:
            return
        if batch.attempt > self._attempt or batch.restart:
            self._void("retried")
            self._attempt = batch.attempt
        for d in batch.deltas:
            if not (d.text or d.tool or d.arguments):
                continue
            self._written = batch.attempt
            self._events.emit(
                EventKind.MODEL_DELTA,
                step=self._state.step,
                attempt=batch.attempt,
                text=d.text,
                call_id=str(d.call_index) if d.call_index >= 0 else "",
                tool=d.tool,
                arguments=d.arguments,
            )

    def _void(self, why: str) -> None:
        """Tell watchers the text written so far in this step is not the reply."""
        if self._written:
            self._written = 0
            self._events.emit(EventKind.MODEL_DISCARD, step=self._state.step, detail=why)

    async def _call(
        self, spec: AgentSpec, tools: list[ToolSpec] | None, settings: ModelSettings
    ) -> ModelResult:
        """One model call of this step (its activity, with its retries), streamed."""
        self._calls += 1
        self._flight = f"{self._state.step}.{self._calls}"
        self._attempt = 0
        chain = self._by_reference(spec)
        try:
            result = await model_step(spec, self._state, tools, settings, self._flight, chain)
        except BaseException as e:
            if chain is not None and isinstance(e, ActivityError):
                if failure_type(e) == errors.TRANSCRIPT_MISSING:
                    # the store lost a piece of the conversation: this step goes whole
                    chain.forget()
                    self._state.context_stored = ""
                    self._flight = ""
                    return await self._call(spec, tools, settings)
            cancelled = isinstance(e, asyncio.CancelledError) or (
                isinstance(e, ActivityError) and isinstance(e.cause, CancelledError)
            )
            self._void("interrupted" if cancelled else "failed")
            raise
        finally:
            self._flight = ""
        if chain is not None:
            chain.stored(result.stored)
            self._state.context_stored = chain.carried()
        if self._written and self._written != result.attempt:
            self._void("retried")  # what an earlier attempt wrote is not the reply
        self._written = 0
        return result

    def resume(self) -> None:
        """`keel resume`: a waiting run asks its provider again now."""
        self._resume = True

    async def ask(self, spec: AgentSpec, tools: list[ToolSpec] | None) -> ModelResult:
        """The model's reply for this step, from the agent's model or one of its fallbacks."""
        st = self._state
        chain = spec.model.chain()
        backoff = chain[0].retry_initial_seconds
        i = 0
        while True:
            settings = chain[i]
            try:
                result = await self._call(spec, tools, settings)
                if st.provider_error or st.status == AgentStatus.WAITING_PROVIDER:
                    st.provider_error = ""
                    st.status = AgentStatus.RUNNING
                    self._publish()
                return result
            except errors.KeelError as e:
                self._fail(e.message, e.type or "KeelError")
            except ActivityError as e:
                if isinstance(e.cause, CancelledError):
                    raise
                kind = failure_type(e) or errors.PROVIDER_UNAVAILABLE
                message = f"{settings.model or 'default model'}: {failure_message(e)}"
                if kind in errors.FALLBACK and i + 1 < len(chain):
                    i += 1
                    st.record(
                        AuditEntry(
                            at=workflow.now(),
                            kind=AuditKind.MODEL_FALLBACK,
                            detail=f"{message}; step {st.step} goes to {chain[i].model}",
                        )
                    )
                    continue
                if kind not in errors.WAIT_AND_RETRY:
                    self._fail(message, kind)
                wait = AUTH_RETRY_SECONDS if kind == errors.PROVIDER_AUTH else backoff
                await self._wait_for_provider(spec, message, max(wait, failure_retry_after(e)))
                backoff = min(backoff * 2, settings.retry_max_seconds)
                i = 0  # after a wait, the agent's own model first

    async def _wait_for_provider(self, spec: AgentSpec, error: str, seconds: float) -> None:
        """Wait (durably) before asking the provider again: the run shows `waiting_provider`
        and the error; `keel resume` cuts the wait short; the time budget ends it."""
        st = self._state
        spent = time_exhausted(spec, st, workflow.now())
        if spent:
            raise EndRun(
                AgentStatus.BUDGET_EXHAUSTED, f"{spent}; the provider kept failing: {error}"
            )
        seconds = max(min(seconds, time_left(spec, st, workflow.now())), 0.001)
        # the status stays waiting_provider until a model call succeeds
        st.status = AgentStatus.WAITING_PROVIDER
        st.provider_error = error
        self._publish()
        try:
            await workflow.wait_condition(
                lambda: self._resume,
                timeout=timedelta(seconds=seconds),
                timeout_summary="the model provider is asked again",
            )
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if st.status == AgentStatus.WAITING_PROVIDER:  # an interrupt ends the wait
                st.status = AgentStatus.RUNNING
            raise
        self._resume = False
        if workflow.info().is_continue_as_new_suggested():
            # a long outage must not grow one history without bound: the step starts again
            # in a fresh history (none of its model calls had an answer)
            await self._continue_as_new()
