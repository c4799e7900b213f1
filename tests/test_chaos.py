"""`keel chaos`: its checks on crafted records (they must catch what they claim to), the
script its agent follows, and one small chaos session end to end."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from keel.chaos.agent import (
    DONE_ANSWER,
    STOPPED_ANSWER,
    chaos_rules,
    first_message,
    op_of,
    request_run,
)
from keel.chaos.check import (
    Disruption,
    EffectSeen,
    LedgerRow,
    ModelCall,
    RunOutcome,
    SentDecision,
    SentMessage,
    ToolAttempt,
    check,
    p50_max,
    recovery,
    spurious_retries,
    summary_line,
)
from keel.chaos.run import ChaosError, ChaosOptions, fault_specs
from keel.testing.model_server import RuleSet

KEEL = str(Path(sys.executable).parent / "keel")
SUMMARY = re.compile(
    r"^chaos: (?P<runs>\d+) runs, (?P<completed>\d+) completed, (?P<dup>\d+) duplicate effects, "
    r"(?P<lost>\d+) lost, recovery p50 (?P<p50>\d+\.\d)s max (?P<max>\d+\.\d)s, "
    r"(?P<unexpected>\d+) unexpected, (?P<kills>\d+) kills, (?P<restarts>\d+) server restarts, "
    r"(?P<faults>\d+) model faults, (?P<repeats>\d+) model steps asked again "
    r"\((?P<explained>\d+) in flight at a kill\), (?P<spurious>\d+) retries of live calls$"
)


# --- the checks, on crafted records --------------------------------------------------------


def done_run(run: str, of: int = 2, amount: float = 10.0) -> tuple[RunOutcome, list[LedgerRow]]:
    """A run that made its `of` transfers, and the ledger rows that match them."""
    effects = [EffectSeen(f"{run}-key:{n}:0", run, n, amount) for n in range(1, of + 1)]
    rows = [LedgerRow(e.key, op_of(run, e.n), run, amount) for e in effects]
    outcome = RunOutcome(
        run, of, status="completed", final_answer=DONE_ANSWER.format(of=of), effects=effects
    )
    return outcome, rows


def test_clean_records_pass() -> None:
    a, rows_a = done_run("a")
    b, rows_b = done_run("b", of=3)
    v = check([a, b], rows_a + rows_b)
    assert (v.runs, v.completed, v.duplicates, v.lost, v.unexpected) == (2, 2, 0, 0, 0)
    assert v.ok and v.problems == []


def test_a_duplicated_ledger_key_is_a_duplicate_effect() -> None:
    a, rows = done_run("a")
    v = check([a], [*rows, rows[0]])
    assert v.duplicates == 1 and not v.ok
    assert "2 ledger rows for the key a-key:1:0" in v.problems[0]


def test_one_transfer_under_two_keys_is_a_duplicate_effect() -> None:
    """What an unstable idempotency key does: the system keeps one row per key, twice."""
    a, rows = done_run("a")
    again = LedgerRow("a-key:9:0", op_of("a", 1), "a", 10.0)
    v = check([a], [*rows, again])
    assert v.duplicates == 1
    assert any("transfer a#1 was made 2 times" in p for p in v.problems)
    assert any("is in no run's record" in p for p in v.problems)  # and a row no run owns
    assert v.lost == 1


def test_effects_and_rows_must_match_one_to_one() -> None:
    a, rows = done_run("a", of=3)
    v = check([a], rows[:2])  # transfer 3 is in the record, not in the ledger
    assert v.lost == 1 and "has no ledger row" in v.problems[0]
    edited = [*rows[:2], LedgerRow(rows[2].key, rows[2].op, "a", 99.0)]
    v = check([a], edited)  # the ledger holds another amount than the run recorded
    assert v.unexpected == 1 and "the ledger holds a#3 of 99" in v.problems[0]


def test_runs_that_did_not_end_well() -> None:
    unfinished = RunOutcome("u", 2, status="running")
    unread = RunOutcome("x", 2)
    failed = RunOutcome("f", 2, status="failed", error="boom")
    short, rows = done_run("s", of=3)
    short.effects = short.effects[:2]  # says done, but transfer 3 is missing
    v = check([unfinished, unread, failed, short], rows[:2])
    assert (v.completed, v.lost, v.unexpected) == (1, 3, 1)
    assert any("did not finish in time (still running)" in p for p in v.problems)
    assert any("ended failed: boom" in p for p in v.problems)
    assert any("transfers [3] of 3 are not in its record" in p for p in v.problems)


def test_a_rejection_ends_a_run_early_and_that_is_allowed() -> None:
    a, rows = done_run("a", of=4)
    a.effects, a.final_answer = a.effects[:1], STOPPED_ANSWER
    v = check([a], rows[:1])
    assert v.ok and (v.completed, v.stopped) == (1, 1)


def test_accepted_messages_must_be_read_once() -> None:
    a, rows = done_run("a")
    a.user_texts = ["go", "note 1", "note 2", "note 2"]
    sent = [
        SentMessage("a", "note 1", "s1", "queued"),
        SentMessage("a", "note 1", "s1", "duplicate"),  # sent again with the same id
        SentMessage("a", "note 2", "s2", "delivered"),  # read twice
        SentMessage("a", "note 3", "s3", "queued"),  # never read
        SentMessage("a", "note 4", "s4", "queued"),  # kept as a signal, refused by the run
        SentMessage("a", "note 5", "s5", "rejected"),  # refused at the door: fine
    ]
    a.refused_senders = {"s4"}
    v = check([a], rows, messages=sent)
    assert (v.lost, v.unexpected) == (1, 1)
    assert any("'note 3' was accepted (queued) but never read" in p for p in v.problems)
    assert any("'note 2' is in its transcript 2 times" in p for p in v.problems)


def test_accepted_decisions_must_be_recorded() -> None:
    a, rows = done_run("a")
    a.decisions = {"c1": ("approved", "ann"), "c2": ("rejected", "bob")}
    a.refused_decisions = {("c4", "dan")}
    sent = [
        SentDecision("a", "c1", "approved", "ann", True),
        SentDecision("a", "c2", "edited", "bob", True),  # recorded as something else
        SentDecision("a", "c3", "approved", "cat", None),  # a signal the run never saw
        SentDecision("a", "c4", "approved", "dan", None),  # a signal the run refused
        SentDecision("a", "c5", "approved", "eve", False),  # refused by the update
    ]
    v = check([a], rows, decisions=sent)
    assert v.lost == 2
    assert any("edited of c2 by bob was accepted" in p for p in v.problems)
    assert any("approved of c3 by cat was sent as a signal" in p for p in v.problems)


def test_malformed_signals_must_be_recorded_as_refused() -> None:
    a, rows = done_run("a")
    a.signal_refusals = 2
    assert check([a], rows, malformed={"a": 2}).ok
    v = check([a], rows, malformed={"a": 3})
    assert v.unexpected == 1 and "3 malformed signals sent, 2 recorded" in v.problems[0]


def test_a_model_step_asked_again_needs_a_kill_in_between() -> None:
    a, rows = done_run("a")
    calls = [
        ModelCall("a", "k1", "served", 10.0, worker=0),
        ModelCall("a", "k1", "served", 20.0, worker=1),  # worker 0, killed at 15, had asked
        ModelCall("a", "k2", "fault:500", 21.0, worker=1),  # faults are retried: no repeat
        ModelCall("a", "k2", "served", 22.0, worker=1),
        ModelCall("a", "k2", "served", 30.0, worker=0),  # nothing happened to worker 1
        ModelCall("a", "k3", "served", 31.0, worker=1),
        ModelCall("a", "k3", "served", 40.0, worker=1),  # the server restarted meanwhile
    ]
    kills = [Disruption("kill", 15.0, 15.0, ["a"], worker=0)]
    kills += [Disruption("kill", 25.0, 25.0, ["a"], worker=0)]  # the wrong worker
    restart = Disruption("server restart", 33.0, 35.0, ["a"])
    v = check([a], rows, model_calls=calls, disruptions=[*kills, restart])
    assert (v.model_repeats, v.model_repeats_explained, v.unexpected) == (3, 2, 1)
    assert "answered at 22.0 (worker 1) was asked again at 30.0 (worker 0)" in v.problems[0]


def test_a_call_tried_again_while_its_worker_lived_is_a_spurious_retry() -> None:
    calls = [
        ModelCall("a", "k1", "pending", 10.0, worker=0),
        ModelCall("a", "k1", "served", 14.0, worker=1),  # worker 0 was killed at 12
        ModelCall("a", "k2", "fault:slow", 20.0, worker=1),  # the provider failed it
        ModelCall("a", "k2", "served", 22.0, worker=1),
        ModelCall("a", "k3", "pending", 30.0, worker=1),
        ModelCall("a", "k3", "served", 33.0, worker=2),  # worker 1 was alive: spurious
    ]
    attempts = [
        ToolAttempt("a-key:1:0", "a", 101, 15.0),
        ToolAttempt("a-key:1:0", "a", 102, 17.0),  # pid 101 was killed at 16
        ToolAttempt("a-key:2:0", "a", 102, 40.0),
        ToolAttempt("a-key:2:0", "a", 103, 41.0),  # pid 102 was alive: spurious
        ToolAttempt("a-key:3:0", "a", 103, 50.0),
        ToolAttempt("a-key:3:0", "a", 103, 55.0),  # the server restarted in between
    ]
    struck = [
        Disruption("kill", 12.0, 12.0, ["a"], worker=0, pid=100),
        Disruption("kill", 16.0, 16.0, ["a"], worker=0, pid=101),
        Disruption("server restart", 52.0, 53.0, ["a"]),
    ]
    found = spurious_retries(calls, attempts, struck)
    assert len(found) == 2, found
    assert "model call of 30.0s (worker 1) was asked again at 33.0s" in found[0]
    assert "tool call a-key:2:0 of 40.0s (pid 102) was tried again at 41.0s" in found[1]
    assert spurious_retries(calls[:4], attempts[:2], struck) == []


def test_recovery_is_per_run_hit_and_reports_median_and_worst() -> None:
    kills = [Disruption("kill", 10.0, 10.0, ["a", "b"]), Disruption("kill", 50.0, 50.0, ["c"])]
    progress = {"a": [9.0, 12.0, 13.0], "b": [16.0], "c": [40.0]}
    closed = {"c": 53.0}  # c did nothing more but end
    samples = recovery(kills, progress, closed)
    assert samples == [2.0, 6.0, 3.0]
    assert p50_max(samples) == (3.0, 6.0) and p50_max([]) == (0.0, 0.0)


def test_a_wait_the_restart_or_a_person_broke_into_is_not_a_kills() -> None:
    kill = Disruption("kill", 10.0, 10.0, ["a", "b", "c"])
    progress = {"a": [12.0], "b": [18.0], "c": [19.0]}
    restart = Disruption("server restart", 14.0, 16.0, ["b"])  # b had not moved yet
    decided = [SentDecision("c", "call", "approved", "ann", True, at=17.0)]  # c waited on ann
    assert recovery([kill], progress, {}, [restart], decided) == [2.0]
    assert recovery([kill], progress, {}) == [2.0, 8.0, 9.0]


def test_summary_line_is_what_scripts_read() -> None:
    a, rows = done_run("a")
    line = summary_line(check([a], rows), [2.14, 6.81], kills=3, restarts=1, faults=7)
    m = SUMMARY.match(line)
    assert m, line
    assert line.startswith("chaos: 1 runs, 1 completed, 0 duplicate effects, 0 lost, ")
    assert (m["p50"], m["max"], m["kills"], m["restarts"]) == ("4.5", "6.8", "3", "1")


# --- the agent's script and the options ----------------------------------------------------


def reply(rules: RuleSet, messages: list[dict[str, Any]]) -> tuple[str, str]:
    """The rule that answers this conversation, and its text or the transfer number."""
    rule, r, caps = rules.select({"messages": messages})
    if r.tool_calls:
        n = r.tool_calls[0].arguments["n"]
        return rule.name if rule else "", str(caps.get("n", n))
    return rule.name if rule else "", (r.content or "").format(of=caps.get("of"))


def test_the_script_never_repeats_nor_skips_a_transfer() -> None:
    rules = RuleSet.from_dict(chaos_rules())
    ask = {"role": "user", "content": first_message("r-1", 3, 75)}
    assert request_run({"messages": [ask]}) == "r-1"
    call = {"role": "assistant", "content": ""}
    result = '{"ref": "r-1#1", "amount": 75.0, "n": 1, "next": 2, "remaining": 2}'
    after_1 = [ask, call, {"role": "tool", "content": result}]
    assert reply(rules, [ask]) == ("first transfer", "1")
    assert reply(rules, after_1) == ("next transfer", "2")
    # transfer 2 was interrupted before it ran: after the message, transfer 2 again
    interrupted = [*after_1, call, {"role": "tool", "content": "Interrupted by user: ..."}]
    note = {"role": "user", "content": "chaos interrupt message 0 for r-1: please carry on"}
    assert reply(rules, [*interrupted, note]) == ("follow-up, go on", "2")
    last = result.replace('"remaining": 2', '"remaining": 0')
    edited = [*after_1, call, {"role": "tool", "content": "Approved by x with changed ... " + last}]
    assert reply(rules, edited) == ("all done", "All 3 transfers done.")
    rejected = [*after_1, call, {"role": "tool", "content": "Rejected by x: no"}]
    assert reply(rules, rejected) == ("rejected", STOPPED_ANSWER)
    assert reply(rules, [*rejected, note]) == ("follow-up, rejected", STOPPED_ANSWER)


def test_fault_kinds_share_the_rate() -> None:
    specs = fault_specs(0.2, seed=1)
    assert [s["kind"] for s in specs] == ["429", "500", "slow", "malformed"]
    passed, shares = 1.0, []
    for s in specs:  # faults are tried in order: each rate is of what the ones before let by
        shares.append(passed * s["rate"])
        passed *= 1 - s["rate"]
    assert shares == pytest.approx([0.05] * 4) and fault_specs(0, seed=1) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"runs": 0}, "--runs must be at least 1"),
        ({"fault_rate": 1.5}, "--fault-rate must be at least 0 and below 1"),
        ({"address": "nowhere"}, "--address must be host:port"),
    ],
)
def test_bad_options_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ChaosError, match=re.escape(message)):
        ChaosOptions(**change).validate()


# --- the command, end to end ---------------------------------------------------------------


async def keel_chaos(*args: str, timeout: float = 150) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "OPENAI_"))}
    proc = await asyncio.create_subprocess_exec(
        KEEL, "chaos", *args, env=env, start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.send_signal(signal.SIGTERM)  # it tears its server and workers down
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        pytest.fail(f"keel chaos took over {timeout} s:\n{out.decode()}\n{err.decode()}")
    return proc.returncode or 0, out.decode(), err.decode()


async def test_bad_options_are_one_line_errors() -> None:
    code, out, err = await keel_chaos("--runs", "0")
    assert (code, out, err.strip()) == (1, "", "keel: --runs must be at least 1")
    code, _, err = await keel_chaos("--kill-every", "often")
    assert code == 2 and "argument --kill-every: invalid float value: 'often'" in err
    assert "Traceback" not in err


async def test_a_small_chaos_session_loses_nothing_and_does_nothing_twice() -> None:
    """6 runs on 2 workers; a worker is SIGKILLed every ~5 s and the Temporal server once,
    while the model fails on 15% of its calls."""
    code, out, err = await keel_chaos(
        "--runs", "6", "--workers", "2", "--kill-every", "5", "--fault-rate", "0.15",
        "--duration", "20", "--deadline", "60", "--seed", "7",
    )  # fmt: skip
    last = out.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, f"{out}\n{err}"
    assert code == 0, out
    assert (m["runs"], m["completed"], m["dup"], m["lost"], m["unexpected"]) == (
        "6", "6", "0", "0", "0"
    ), out  # fmt: skip
    assert int(m["kills"]) >= 2 and m["restarts"] == "1", out
    assert int(m["repeats"]) == int(m["explained"]), out
    assert m["spurious"] == "0", out
    assert "killed the Temporal server" in out and "Traceback" not in out + err
