"""What `keel chaos` checks once its runs are over: pure functions over what it gathered
(the runs' records, the ledger, the model's request log, what it sent and when it struck),
so that each check is tested on crafted data without a server.

- Every run ended, `completed` (having made all its transfers, or stopped by a rejection).
- Every effect a run recorded matches exactly one ledger row by idempotency key, every row
  matches an effect, and no transfer (run and number) was made twice under two keys.
- Every message and decision a run accepted is in its transcript (once) or its decisions;
  every malformed signal is in its audit trail as refused.
- No model step that was answered was asked again, unless the worker that asked it was
  killed, or the server restarted, between the answer and the new request (the call was in
  flight there).
- No call is tried again while the attempt before it was alive: a model request or a tool
  write repeated with no fault, kill or restart in between is a spurious retry (a live but
  slow call whose heartbeats did not arrive in time).
- Recovery: for each worker kill, each run it hit waits from the kill until its next
  progress (a model request, a tool attempt, its end).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.chaos.agent import DONE_ANSWER, STOPPED_ANSWER, op_of
from keel.workflows.models import AuditKind, RunState

MALLORY = "chaos-mallory"  # signs the decisions for calls that do not exist

ACCEPTED = ("queued", "delivered", "duplicate")


@dataclass
class EffectSeen:
    """A transfer a run's record lists as committed."""

    key: str
    run: str
    n: int
    amount: float


@dataclass
class LedgerRow:
    """A transfer the ledger holds."""

    key: str
    op: str
    run: str
    amount: float


@dataclass
class RunOutcome:
    """One run as its record reads at the end (status "" when it could not be read)."""

    run_id: str
    of: int
    status: str = ""
    final_answer: str | None = None
    error: str | None = None
    effects: list[EffectSeen] = field(default_factory=list)
    user_texts: list[str] = field(default_factory=list)
    decisions: dict[str, tuple[str, str]] = field(default_factory=dict)  # call → outcome, by
    refused_decisions: set[tuple[str, str]] = field(default_factory=set)  # (call, approver)
    refused_senders: set[str] = field(default_factory=set)  # messages the run refused
    signal_refusals: int = 0  # malformed signals recorded as refused


@dataclass
class SentMessage:
    run_id: str
    text: str
    sender: str
    receipt: str  # queued / delivered / duplicate / rejected / unknown (no answer)


@dataclass
class SentDecision:
    run_id: str
    call_id: str
    outcome: str  # approved / edited / rejected
    approver: str
    accepted: bool | None  # the update's answer; None: sent as a signal
    at: float = 0.0  # when it was sent


@dataclass
class ModelCall:
    run: str
    key: str  # the conversation it carried
    outcome: str
    at: float
    worker: int = 0  # which worker slot sent it


@dataclass
class ToolAttempt:
    """A transfer's write as the ledger logged it: which key, from which worker process."""

    key: str
    run: str
    pid: int
    at: float


@dataclass
class Disruption:
    kind: str  # "kill" (of a worker), "exit" (a worker died by itself) or "server restart"
    at: float
    until: float  # when it was over (the server answered again); == at for a worker
    hit: list[str] = field(default_factory=list)  # the runs with work in flight there
    worker: int | None = None  # the worker slot; None: everything (the server)
    pid: int | None = None  # the worker process that died


@dataclass
class Verdict:
    runs: int = 0
    completed: int = 0
    stopped: int = 0  # completed after a rejection
    duplicates: int = 0
    lost: int = 0
    unexpected: int = 0
    model_repeats: int = 0  # answered model steps asked again
    model_repeats_explained: int = 0  # ... with a kill or the restart in between
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.unexpected)

    def _add(self, kind: str, problem: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        self.problems.append(f"{kind}: {problem}")


@dataclass
class Observed:
    """What the harness saw of the runs, and what it sent and struck, for the checks."""

    pending: dict[str, int] = field(default_factory=dict)  # approvals, from visibility
    closed: dict[str, float] = field(default_factory=dict)  # when each run closed
    messages: list[SentMessage] = field(default_factory=list)
    decisions: list[SentDecision] = field(default_factory=list)
    malformed: Counter[str] = field(default_factory=Counter)  # malformed signals sent, by run
    disruptions: list[Disruption] = field(default_factory=list)  # worker kills
    restarts: list[Disruption] = field(default_factory=list)  # the server's
    exits: list[Disruption] = field(default_factory=list)  # workers that died by themselves
    notes: list[str] = field(default_factory=list)


def outcome_of(run_id: str, of: int, st: RunState) -> RunOutcome:
    """What the checks need of a run's record."""
    out = RunOutcome(run_id, of, st.status.value, st.final_answer, st.error)
    for e in st.effects:
        a = e.arguments
        n, amount = int(a.get("n", 0)), float(a.get("amount", 0))
        out.effects.append(EffectSeen(e.idempotency_key, str(a.get("run")), n, amount))
    out.user_texts = [m.content or "" for m in st.transcript if m.role == "user"]
    out.decisions = {d.call_id: (d.outcome, d.by) for d in st.decisions}
    for a in st.audit:
        if a.kind == AuditKind.DECISION_REFUSED:
            out.refused_decisions.add((a.call_id, a.actor))
        if a.kind == AuditKind.MESSAGE_REJECTED:
            out.refused_senders.add(a.actor)
        if a.kind == AuditKind.SIGNAL_REFUSED or (
            a.kind == AuditKind.DECISION_REFUSED and a.actor == MALLORY
        ):
            out.signal_refusals += 1
    return out


def conversation_key(body: dict[str, Any]) -> str:
    """What identifies a model step's request: the conversation it carries."""
    text = json.dumps(body.get("messages"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check(
    runs: Sequence[RunOutcome],
    ledger: Sequence[LedgerRow],
    messages: Sequence[SentMessage] = (),
    decisions: Sequence[SentDecision] = (),
    malformed: dict[str, int] | None = None,
    model_calls: Sequence[ModelCall] = (),
    disruptions: Sequence[Disruption] = (),
) -> Verdict:
    """Every check over the gathered data."""
    v = Verdict(runs=len(runs))
    by_id = {r.run_id: r for r in runs}
    for r in runs:
        _check_run(v, r)
    _check_ledger(v, by_id, list(ledger))
    _check_messages(v, by_id, list(messages))
    _check_decisions(v, by_id, list(decisions))
    for run_id, sent in sorted((malformed or {}).items()):
        r = by_id.get(run_id)
        if r is not None and r.status and r.signal_refusals < sent:
            v._add(
                "unexpected",
                f"{run_id}: {sent} malformed signals sent, {r.signal_refusals} recorded as refused",
            )
    _check_model(v, list(model_calls), list(disruptions))
    return v


def _check_run(v: Verdict, r: RunOutcome) -> None:
    if not r.status:
        v._add("lost", f"{r.run_id}: its record could not be read")
        return
    if r.status not in ("completed", "failed", "cancelled", "budget_exhausted"):
        v._add("lost", f"{r.run_id}: did not finish in time (still {r.status})")
        return
    if r.status != "completed":
        v._add("unexpected", f"{r.run_id}: ended {r.status}: {r.error}")
        return
    v.completed += 1
    made = sorted(e.n for e in r.effects)
    if r.final_answer == DONE_ANSWER.format(of=r.of):
        want = list(range(1, r.of + 1))
    elif r.final_answer == STOPPED_ANSWER:
        v.stopped += 1
        want = list(range(1, len(set(made)) + 1))
    else:
        v._add("unexpected", f"{r.run_id}: completed with the answer {r.final_answer!r}")
        return
    missing = sorted(set(want) - set(made))
    if missing:
        v._add("lost", f"{r.run_id}: transfers {missing} of {r.of} are not in its record")


def _check_ledger(v: Verdict, runs: dict[str, RunOutcome], ledger: list[LedgerRow]) -> None:
    rows_by_key: dict[str, list[LedgerRow]] = defaultdict(list)
    keys_by_op: dict[str, set[str]] = defaultdict(set)
    for row in ledger:
        rows_by_key[row.key].append(row)
        keys_by_op[row.op].add(row.key)
    for key, rows in rows_by_key.items():
        if len(rows) > 1:
            v._add("duplicates", f"{len(rows)} ledger rows for the key {key}", len(rows) - 1)
    for op, keys in sorted(keys_by_op.items()):
        if len(keys) > 1:
            v._add(
                "duplicates",
                f"transfer {op} was made {len(keys)} times, under keys {sorted(keys)}",
                len(keys) - 1,
            )
    recorded: set[str] = set()
    for r in runs.values():
        for e in r.effects:
            recorded.add(e.key)
            rows = rows_by_key.get(e.key, [])
            if not rows:
                v._add(
                    "lost", f"{r.run_id}: effect {op_of(e.run, e.n)} ({e.key}) has no ledger row"
                )
                continue
            row = rows[0]
            if row.op != op_of(e.run, e.n) or abs(row.amount - e.amount) > 1e-9:
                v._add(
                    "unexpected",
                    f"{r.run_id}: effect {op_of(e.run, e.n)} of {e.amount:g} ({e.key}) but the "
                    f"ledger holds {row.op} of {row.amount:g}",
                )
    for key, rows in rows_by_key.items():
        owner = runs.get(rows[0].run)
        if key not in recorded and (owner is None or owner.status):  # records that were read
            v._add("lost", f"ledger row {rows[0].op} ({key}) is in no run's record")


def _check_messages(v: Verdict, runs: dict[str, RunOutcome], sent: list[SentMessage]) -> None:
    by_text: dict[tuple[str, str], list[SentMessage]] = defaultdict(list)
    for m in sent:
        by_text[(m.run_id, m.text)].append(m)
    for (run_id, text), copies in sorted(by_text.items()):
        r = runs.get(run_id)
        if r is None or not r.status:
            continue
        seen = r.user_texts.count(text)
        accepted = any(m.receipt in ACCEPTED for m in copies)
        refused = any(m.sender in r.refused_senders for m in copies)
        if seen > 1:
            v._add("unexpected", f"{run_id}: message {text!r} is in its transcript {seen} times")
        elif accepted and seen == 0 and not refused:
            receipts = ", ".join(m.receipt for m in copies)
            v._add("lost", f"{run_id}: message {text!r} was accepted ({receipts}) but never read")
        elif seen and all(m.receipt == "rejected" for m in copies):
            v._add("unexpected", f"{run_id}: message {text!r} was refused, yet read")


def _check_decisions(v: Verdict, runs: dict[str, RunOutcome], sent: list[SentDecision]) -> None:
    for d in sent:
        r = runs.get(d.run_id)
        if r is None or not r.status or d.accepted is False:
            continue
        got = r.decisions.get(d.call_id)
        if got == (d.outcome, d.approver):
            continue
        if d.accepted is None and (d.call_id, d.approver) in r.refused_decisions:
            continue  # a signal the run refused (the call was withdrawn meanwhile, say)
        how = "accepted" if d.accepted else "sent as a signal"
        v._add(
            "lost",
            f"{d.run_id}: decision {d.outcome} of {d.call_id} by {d.approver} was {how} but "
            f"the run recorded {got or 'nothing'}",
        )


def _check_model(v: Verdict, calls: list[ModelCall], disruptions: list[Disruption]) -> None:
    """An answered step asked again is excused only when the worker that had asked it died
    (or the server restarted) between the answer and the new request."""
    served: dict[tuple[str, str], list[ModelCall]] = defaultdict(list)
    for c in sorted(calls, key=lambda c: c.at):
        if c.outcome == "served":
            served[(c.run, c.key)].append(c)
    for (run, _), asks in sorted(served.items()):
        for before, again in zip(asks, asks[1:], strict=False):
            v.model_repeats += 1
            if any(
                d.worker in (None, before.worker) and d.at <= again.at and d.until >= before.at
                for d in disruptions
            ):
                v.model_repeats_explained += 1
            else:
                v._add(
                    "unexpected",
                    f"{run}: a model step answered at {before.at:.1f} (worker {before.worker}) "
                    f"was asked again at {again.at:.1f} (worker {again.worker}) with no kill or "
                    "restart in between",
                )


def spurious_retries(
    calls: Sequence[ModelCall],
    attempts: Sequence[ToolAttempt],
    disruptions: Sequence[Disruption],
    t0: float = 0.0,
) -> list[str]:
    """Calls tried again while the attempt before them was alive (times said from `t0`): a model request repeated
    (same run, same conversation) after one the provider did not fail, or a transfer written
    again under its key, with no kill or exit of the worker that had the earlier attempt and
    no server restart in between. Each is a heartbeat timeout of a live call."""
    found = []

    def hit(worker: int | None, pid: int | None, start: float, end: float) -> bool:
        """A restart, or the death of the worker (slot, or process) in [start, end]."""
        return any(
            (d.worker is None or (d.pid == pid if pid is not None else d.worker == worker))
            and d.at <= end
            and d.until >= start
            for d in disruptions
        )

    asks: dict[tuple[str, str], list[ModelCall]] = defaultdict(list)
    for c in sorted(calls, key=lambda c: c.at):
        asks[(c.run, c.key)].append(c)
    for (run, _), seq in sorted(asks.items()):
        for before, again in zip(seq, seq[1:], strict=False):
            failed = before.outcome.startswith(("fault:", "broken:"))
            if not failed and not hit(before.worker, None, before.at, again.at):
                found.append(
                    f"{run}: the model call of {before.at - t0:.1f}s (worker {before.worker}) "
                    f"was asked again at {again.at - t0:.1f}s while its worker was alive"
                )
    writes: dict[str, list[ToolAttempt]] = defaultdict(list)
    for a in sorted(attempts, key=lambda a: a.at):
        writes[a.key].append(a)
    for key, seq in sorted(writes.items()):
        for before, again in zip(seq, seq[1:], strict=False):
            if not hit(None, before.pid, before.at, again.at):
                found.append(
                    f"{before.run}: the tool call {key} of {before.at - t0:.1f}s (pid "
                    f"{before.pid}) was tried again at {again.at - t0:.1f}s while its worker "
                    "was alive"
                )
    return found


def waits(
    disruptions: Sequence[Disruption],
    progress: dict[str, list[float]],
    closed: dict[str, float],
    restarts: Sequence[Disruption] = (),
    decisions: Sequence[SentDecision] = (),
) -> list[tuple[float, str, Disruption]]:
    """For each disruption and each run it hit: seconds from it until that run's next
    progress (or its end), the run, the disruption. Runs that never moved again are left
    out (they count as lost); so is a wait the server's restart broke into (the server went
    down before the run moved again: the run is counted in the restart's recovery), and a
    wait for a person (the run asked for a decision, which came before it moved again)."""
    decided: dict[str, list[float]] = defaultdict(list)
    for x in decisions:
        decided[x.run_id].append(x.at)
    out = []
    for d in disruptions:
        for run in d.hit:
            after = [t for t in progress.get(run, []) if t > d.at]
            end = closed.get(run)
            if end is not None and end > d.at:
                after.append(end)
            if not after:
                continue
            moved = min(after)
            broken = any(d.at < r.at < moved for r in restarts)
            if not broken and not any(d.at < t < moved for t in decided[run]):
                out.append((moved - d.at, run, d))
    return out


def recovery(
    disruptions: Sequence[Disruption],
    progress: dict[str, list[float]],
    closed: dict[str, float],
    restarts: Sequence[Disruption] = (),
    decisions: Sequence[SentDecision] = (),
) -> list[float]:
    """The seconds of `waits`: per disruption, per run it hit, until that run moved again."""
    return [w for w, _, _ in waits(disruptions, progress, closed, restarts, decisions)]


def p50_max(samples: list[float]) -> tuple[float, float]:
    """The median and the maximum (0 and 0 without samples)."""
    if not samples:
        return 0.0, 0.0
    return statistics.median(samples), max(samples)


def summary_line(
    v: Verdict, samples: list[float], kills: int, restarts: int, faults: int, spurious: int = 0
) -> str:
    """The last line of `keel chaos`, for scripts."""
    p50, worst = p50_max(samples)
    return (
        f"chaos: {v.runs} runs, {v.completed} completed, {v.duplicates} duplicate effects, "
        f"{v.lost} lost, recovery p50 {p50:.1f}s max {worst:.1f}s, "
        f"{v.unexpected} unexpected, {kills} kills, {restarts} server restarts, "
        f"{faults} model faults, {v.model_repeats} model steps asked again "
        f"({v.model_repeats_explained} in flight at a kill), "
        f"{spurious} retries of live calls"
    )


def report_lines(
    v: Verdict,
    outcomes: Sequence[RunOutcome],
    ledger: Sequence[LedgerRow],
    seen: Observed,
    faults: Counter[str],
    kills: list[float],
    restart: list[float],
    spurious: Sequence[str] = (),
) -> list[str]:
    """What `keel chaos` prints above its summary: what was done, and every problem."""
    ended = Counter(o.status or "unreadable" for o in outcomes)
    by_update = sum(1 for d in seen.decisions if d.accepted is not None)
    hits = sum(len(d.hit) for d in seen.disruptions)
    lines = [
        f"runs: {dict(ended)}; {v.stopped} of the completed stopped after a rejection",
        f"effects: {len(ledger)} ledger rows, "
        f"{sum(len(o.effects) for o in outcomes)} effects in the runs' records",
        f"messages: {len(seen.messages)} sent ({dict(Counter(m.receipt for m in seen.messages))})",
        f"decisions: {len(seen.decisions)} sent ({by_update} by update, "
        f"{len(seen.decisions) - by_update} by signal), "
        f"{sum(1 for d in seen.decisions if d.accepted is False)} refused",
        f"malformed signals: {sum(seen.malformed.values())} sent, "
        f"{sum(o.signal_refusals for o in outcomes)} recorded as refused",
        f"model: faults {dict(faults)}, {v.model_repeats} answered steps asked again "
        f"({v.model_repeats_explained} in flight at a kill or the restart)",
        f"worker kills: {len(seen.disruptions)}, hitting runs {hits} times; "
        "recovery p50 {:.1f}s max {:.1f}s".format(*p50_max(kills)),
    ]
    for d in seen.restarts:
        lines.append(
            f"server restart: down {d.until - d.at:.1f}s; {len(restart)} runs in flight went "
            "on after p50 {:.1f}s max {:.1f}s".format(*p50_max(restart))
        )
    lines.append(
        f"retries of live calls: {len(spurious)} (a call tried again while the worker that "
        "had it was alive: a heartbeat timeout of a slow call)"
    )
    lines += [f"retried while alive: {x}" for x in spurious]
    lines += [f"note: {n}" for n in seen.notes]
    lines += [f"problem: {p}" for p in v.problems]
    return lines
