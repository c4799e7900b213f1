"""The approval gate: pending requests, decisions, durable expiry. Workflow code only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow

from keel.workflows.decisions import (
    DecisionTarget,
    Verdict,
    approver_roles,
    judge,
    spend_decision,
)
from keel.workflows.events import EventKind, EventLog
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    ApprovalRequest,
    AuditEntry,
    AuditKind,
    DecideInput,
    DecideReceipt,
    Decision,
    DecisionRecord,
    ToolSpec,
)

OUTCOMES = {Decision.APPROVE: "approved", Decision.REJECT: "rejected", Decision.EDIT: "edited"}


class ApprovalExpired(Exception):
    """No decision came before the request expired."""


class Approvals:
    """Opens approval requests and waits, at no cost, for a decision or the expiry timer."""

    def __init__(self, state: AgentState, on_change: Callable[[], None], events: EventLog) -> None:
        self._state = state
        self._on_change = on_change  # e.g. publish the status and PendingApprovals
        self._events = events
        self._decisions: dict[str, DecideInput] = {}
        self._waiting_since: datetime | None = None  # while any request is open

    def verdict(self, spec: AgentSpec | None, d: DecideInput) -> Verdict:
        """The verdict on this decision arriving now (`decisions.judge`). Reads the state only."""
        info = workflow.info()
        target = DecisionTarget(info.namespace, info.workflow_id, info.first_execution_run_id)
        return judge(spec, self._state, d, workflow.now(), target)

    def decide(self, spec: AgentSpec | None, d: DecideInput) -> DecideReceipt:
        """Apply a decision, or record its refusal in the audit trail (never raises)."""
        st = self._state
        verdict = self.verdict(spec, d)
        spend_decision(st, workflow.now(), spec.policy if spec is not None else None)
        if verdict.refusal or verdict.request is None or verdict.decision is None:
            st.record(
                AuditEntry(
                    at=workflow.now(),
                    kind=AuditKind.DECISION_REFUSED,
                    detail=verdict.refusal,
                    actor=d.approver,
                    call_id=d.call_id,
                )
            )
            return DecideReceipt(
                call_id=d.call_id, decision=d.decision, approver=d.approver, accepted=False
            )
        request, d = verdict.request, verdict.decision
        self._decisions[d.call_id] = d
        outcome = OUTCOMES[d.decision]
        st.decisions.append(
            DecisionRecord(
                call_id=d.call_id,
                outcome=outcome,
                by=d.approver,
                at=workflow.now(),
                signed=verdict.signed,
            )
        )
        detail = d.reason
        if d.decision == Decision.EDIT:
            detail = f"runs with arguments {d.arguments}"
        self._events.emit(
            EventKind.APPROVAL_DECIDED,
            step=request.step,
            call_id=d.call_id,
            tool=request.tool,
            detail=f"{outcome}: {detail}" if detail else outcome,
            by=d.approver,
        )
        self._remove(d.call_id)
        st.record(
            AuditEntry(
                at=workflow.now(),
                kind=AuditKind(outcome),
                detail=detail,
                actor=d.approver,
                call_id=d.call_id,
            )
        )
        return DecideReceipt(
            call_id=d.call_id,
            decision=d.decision,
            approver=d.approver,
            arguments=d.arguments if d.decision == Decision.EDIT else request.arguments,
        )

    async def request(
        self,
        spec: AgentSpec,
        call_id: str,
        tool: ToolSpec,
        args: dict[str, Any],
        reason: str,
        step: int,
    ) -> DecideInput:
        """Open a request and wait for its decision; raises ApprovalExpired on the timer."""
        st = self._state
        now = workflow.now()
        timeout = timedelta(seconds=spec.approval_timeout_seconds)
        carried = next((r for r in st.pending_approvals if r.call_id == call_id), None)
        if carried is not None or call_id in self._decisions:
            # opened before continue-as-new: it keeps its deadline, and a decision accepted
            # just before the new history began still answers it
            if carried is not None:
                timeout = max(carried.expires_at - now, timedelta(milliseconds=1))
        else:
            if not st.pending_approvals:
                self._waiting_since = now
            st.pending_approvals.append(
                ApprovalRequest(
                    call_id=call_id,
                    tool=tool.name,
                    arguments=args,
                    reason=reason,
                    approvers=tool.approval.approvers,
                    requested_at=now,
                    expires_at=now + timeout,
                    step=step,
                    approver_roles=(approver_roles(spec.policy, tool.name) or [])
                    if spec.policy
                    else [],
                )
            )
            self._events.emit(
                EventKind.APPROVAL_REQUESTED,
                step=step,
                call_id=call_id,
                tool=tool.name,
                arguments=json.dumps(args),
                detail=reason,
            )
            self._on_change()
        try:
            await workflow.wait_condition(
                lambda: call_id in self._decisions,
                timeout=timeout,
                timeout_summary=f"approval of {tool.name} ({call_id}) expires",
            )
        except TimeoutError:
            self._decisions.pop(call_id, None)
            self._remove(call_id)
            st.decisions.append(
                DecisionRecord(call_id=call_id, outcome="expired", at=workflow.now())
            )
            self._events.emit(
                EventKind.APPROVAL_DECIDED,
                step=step,
                call_id=call_id,
                tool=tool.name,
                detail="expired",
            )
            st.record(
                AuditEntry(
                    at=workflow.now(),
                    kind=AuditKind.EXPIRED,
                    detail=f"no decision within {timeout}; policy: {spec.on_approval_timeout}",
                    call_id=call_id,
                )
            )
            raise ApprovalExpired(call_id) from None
        except asyncio.CancelledError:
            if any(r.call_id == call_id for r in st.pending_approvals):
                now = workflow.now()
                st.decisions.append(DecisionRecord(call_id=call_id, outcome="withdrawn", at=now))
                st.record(AuditEntry(at=now, kind=AuditKind.WITHDRAWN, call_id=call_id))
                self._events.emit(
                    EventKind.APPROVAL_DECIDED,
                    step=step,
                    call_id=call_id,
                    tool=tool.name,
                    detail="withdrawn",
                )
                self._remove(call_id)
            self._decisions.pop(call_id, None)
            raise
        # (no `finally`: on eviction the coroutine is closed outside the workflow's loop)
        self._remove(call_id)
        return self._decisions.pop(call_id)

    def carry(self) -> dict[str, DecideInput]:
        """Before continue-as-new while parked: count the time waited so far as paused, and
        hand over the decisions accepted but not yet acted on."""
        if self._waiting_since is not None:
            now = workflow.now()
            self._state.paused_seconds += (now - self._waiting_since).total_seconds()
            self._waiting_since = now
        return dict(self._decisions)

    def resume(self, decided: dict[str, DecideInput]) -> None:
        """In the new history: the carried requests wait on, from now."""
        self._decisions.update(decided)
        if self._state.pending_approvals:
            self._waiting_since = workflow.now()

    def undecided(self, call_id: str) -> bool:
        """Still waiting for a person: open, and no decision accepted for it."""
        open_ = any(r.call_id == call_id for r in self._state.pending_approvals)
        return open_ and call_id not in self._decisions

    def _remove(self, call_id: str) -> None:
        st = self._state
        st.pending_approvals = [r for r in st.pending_approvals if r.call_id != call_id]
        if not st.pending_approvals and self._waiting_since is not None:
            st.paused_seconds += (workflow.now() - self._waiting_since).total_seconds()
            self._waiting_since = None
        self._on_change()
