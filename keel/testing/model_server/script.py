"""``ScriptedModel``: the model itself, without HTTP: rules, faults, gates, the request log.

It answers a chat request's raw body with an ``Answer`` (a completion, an error, or bytes sent
as they are); how an answer goes on the wire is the HTTP layer's business (``app``). Its state
is read and changed from any thread (a test's, the server's event loop), under one lock.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .completions import MALFORMED_BODY, build_completion, error_body
from .matching import _Conversation, _substitute_text
from .rules import FaultSpec, RuleSet, parse_faults


@dataclass
class Answer:
    """The answer to one chat request: a ``chat.completion``, an error, or raw bytes."""

    status: int = 200
    completion: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    raw: bytes | None = None  # sent verbatim (the malformed fault)
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def failure(
        cls,
        status: int,
        message: str | None = None,
        type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        return cls(status, error=error_body(status, message, type, code), headers=headers or {})


STOPPING = Answer.failure(503, "The scripted model server is stopping.")


@dataclass
class _FaultState:
    spec: FaultSpec
    remaining: int | None
    rng: random.Random

    @classmethod
    def of(cls, spec: FaultSpec) -> _FaultState:
        return cls(spec=spec, remaining=spec.count, rng=random.Random(spec.seed))

    def fires(self) -> bool:
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True
        if self.spec.rate is not None:
            return self.rng.random() < self.spec.rate
        return True


@dataclass(eq=False)
class _Wait:
    """A reply waiting (at a gate, or for its delay) on the event loop that serves it."""

    future: asyncio.Future[bool]
    gate: str | None

    def end(self, passed: bool) -> None:
        def resolve() -> None:
            if not self.future.done():
                self.future.set_result(passed)

        try:
            self.future.get_loop().call_soon_threadsafe(resolve)
        except RuntimeError:  # its loop has closed: nobody waits any more
            pass


class ScriptedModel:
    """Rules (first match wins), faults by count or seeded rate, named gates, counters and a
    log of every chat request. Served over HTTP by ``ScriptedModelServer``."""

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules
        self._lock = threading.Lock()
        self._requests = 0
        self._served = 0
        self._faults_count = 0
        self._errors = 0
        self._generation = 0
        self._log: list[dict[str, Any]] = []
        self._faults: list[_FaultState] = [_FaultState.of(f) for f in rules.faults]
        self._open: set[str] = set()
        self._waits: list[_Wait] = []
        self._stopping = False

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rules (active faults are kept)."""
        self._rules = rules

    # ---- what a test reads and changes

    def stats(self) -> dict[str, int]:
        """``requests`` received, ``served`` (200 completions from rules), ``faults`` injected,
        ``errors`` (invalid requests and rule error replies)."""
        with self._lock:
            return {
                "requests": self._requests,
                "served": self._served,
                "faults": self._faults_count,
                "errors": self._errors,
            }

    def requests(self) -> list[dict[str, Any]]:
        """Chat requests in arrival order: ``{"seq", "at", "body", "outcome", "rule"}`` (``at``:
        when it arrived, in ``time.time()`` seconds)."""
        with self._lock:
            return copy.deepcopy(self._log)

    def faults(self) -> list[dict[str, Any]]:
        """The active fault specs, with ``remaining`` counts."""
        with self._lock:
            return [
                {**f.spec.model_dump(exclude_none=True), "remaining": f.remaining}
                for f in self._faults
            ]

    def set_faults(self, faults: Iterable[FaultSpec | Mapping[str, Any]]) -> None:
        """Replace the active faults (counts and random streams start afresh)."""
        states = [_FaultState.of(f) for f in parse_faults(faults)]
        with self._lock:
            self._faults = states

    def reset(self) -> None:
        """Clear counters, the request log and the active faults."""
        with self._lock:
            self._requests = self._served = self._faults_count = self._errors = 0
            self._log = []
            self._faults = []
            self._generation += 1  # requests still in flight no longer count

    def release(self, name: str) -> None:
        """Open the gate `name` (a reply's ``hold``): replies held at it go out, later ones
        pass straight on."""
        with self._lock:
            self._open.add(name)
            waiting = [w for w in self._waits if w.gate == name]
        for w in waiting:
            w.end(True)

    def held(self, name: str) -> int:
        """How many replies wait at the gate `name` right now."""
        with self._lock:
            return sum(1 for w in self._waits if w.gate == name)

    async def wait_held(self, name: str, count: int = 1) -> None:
        """Return once `count` replies wait at the gate `name`: the requests have arrived,
        and their model calls are in flight until the gate is released."""
        while self.held(name) < count:
            await asyncio.sleep(0.01)  # the replies wait on the server's own loop

    # ---- waiting, which the server's stop ends

    def _begin(self) -> None:
        with self._lock:
            self._stopping = False

    def _end_waits(self) -> None:
        """The server stops: every reply still waiting answers at once."""
        with self._lock:
            self._stopping = True
            waiting = list(self._waits)
        for w in waiting:
            w.end(False)

    async def _wait(self, gate: str | None = None, delay: float | None = None) -> bool:
        """Wait until `gate` opens, or `delay` seconds; False when the server stops first."""
        wait = _Wait(asyncio.get_running_loop().create_future(), gate)
        with self._lock:
            if self._stopping:
                return False
            if gate is not None and gate in self._open:
                return True
            self._waits.append(wait)
        try:
            return await asyncio.wait_for(wait.future, delay)
        except TimeoutError:
            return True
        finally:
            with self._lock:
                self._waits.remove(wait)

    # ---- the chat endpoint

    def _finish(self, entry: dict[str, Any], generation: int, outcome: str, counter: str) -> None:
        with self._lock:
            entry["outcome"] = outcome
            if generation != self._generation:
                return
            if counter == "served":
                self._served += 1
            elif counter == "errors":
                self._errors += 1

    async def answer(self, raw: bytes) -> Answer:
        """The answer to a chat request's raw body, after any delay or gate it waits for."""
        try:
            body: Any = json.loads(raw.decode("utf-8"))
            parsed = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {"_invalid_json": raw[:2000].decode("utf-8", errors="replace")}
            parsed = False
        with self._lock:
            self._requests += 1
            seq = len(self._log)
            generation = self._generation
            entry: dict[str, Any] = {
                "seq": seq,
                "at": time.time(),
                "body": body,
                "outcome": "pending",
                "rule": None,
            }
            self._log.append(entry)
        headers = {"x-request-id": f"req_scripted_{seq}"}

        problem = _problem(body) if parsed else _UNPARSABLE
        if problem is not None:
            self._finish(entry, generation, "error:400", "errors")
            return Answer.failure(400, problem, headers=headers)

        conv = _Conversation.from_body(body)
        fault: FaultSpec | None = None
        with self._lock:
            for state in self._faults:
                if state.spec.when is not None and conv.match(state.spec.when) is None:
                    continue
                if state.fires():
                    fault = state.spec
                    if generation == self._generation:
                        self._faults_count += 1
                    entry["outcome"] = f"fault:{fault.kind}"
                    break

        if fault is not None:
            if fault.kind == "malformed":
                return Answer(raw=MALFORMED_BODY, headers=headers)
            if fault.kind == "slow":
                if not await self._wait(delay=fault.delay):
                    return STOPPING
            else:
                status = int(fault.kind)
                if fault.retry_after is not None and status in (429, 503):
                    ra = fault.retry_after
                    headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
                if fault.should_retry is not None:
                    headers["x-should-retry"] = "true" if fault.should_retry else "false"
                return Answer.failure(status, fault.message, headers=headers)

        rule, reply, captures = self._rules.select(body)
        with self._lock:
            entry["rule"] = rule.name if rule is not None else "default"
        if reply.hold is not None and not await self._wait(gate=reply.hold):
            return STOPPING
        if reply.delay and not await self._wait(delay=reply.delay):
            return STOPPING
        if reply.error is not None:
            err = reply.error
            if fault is None:
                self._finish(entry, generation, f"error:{err.status}", "errors")
            return Answer.failure(
                err.status, _substitute_text(err.message, captures), err.type, err.code, headers
            )
        completion = build_completion(body, reply, captures)
        if fault is None:
            self._finish(entry, generation, "served", "served")
        return Answer(completion=completion, headers=headers)


_UNPARSABLE = (
    "We could not parse the JSON body of your request. (HINT: This likely means "
    "you aren't using your HTTP library correctly.)"
)


def _problem(body: Any) -> str | None:
    """Why this parsed body is not a chat request the scripted model answers, or None."""
    if not isinstance(body, dict):
        return "Invalid request: the body must be a JSON object."
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "Invalid request: 'messages' must be a list of message objects."
    if body.get("stream"):
        return "Invalid request: streaming is not supported by the scripted model server."
    return None
