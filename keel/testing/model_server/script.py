"""``ScriptedModel``: the model itself, without HTTP: rules, faults, gates, the request log.

It answers a chat request's raw body with an ``Answer`` (a completion, an error, bytes sent
as they are, or a streamed request's chunks); how an answer goes on the wire is the HTTP
layer's business (``app``). Its state is read and changed from any thread (a test's, the
server's event loop), under one lock.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .chunks import DONE, MALFORMED_CHUNK, completion_chunks
from .completions import MALFORMED_BODY, build_completion, error_body
from .matching import _Conversation, _substitute_text
from .rules import BreakAfter, FaultSpec, Reply, RuleSet, parse_faults


class DroppedConnection(Exception):
    """Raised where an answer stops short: the connection closes at once, the answer
    unfinished (the ``drop`` fault and break, a stream the server's stop cuts)."""


@dataclass
class Answer:
    """The answer to one chat request: a ``chat.completion``, an error, raw bytes, or the
    events of a stream."""

    status: int = 200
    completion: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    raw: bytes | None = None  # sent verbatim (the malformed fault)
    headers: dict[str, str] = field(default_factory=dict)
    # a streamed answer: each event's data, a chunk or a text sent as it is; the iterator
    # raises DroppedConnection where the connection is to close
    events: AsyncIterator[dict[str, Any] | str] | None = None
    dropped: bool = False  # the completion's body stops halfway and the connection closes

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
        when it arrived, in ``time.time()`` seconds); a streamed reply's entry also has
        ``chunks_at``, when each of its chunks went out (``time.time()``, ``[DONE]`` not
        counted), so a client's view of the reply can be timed against the provider's."""
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

        streamed = bool(body.get("stream"))
        broken: BreakAfter | None = None
        if fault is not None:
            if fault.kind == "malformed" and not streamed:
                return Answer(raw=MALFORMED_BODY, headers=headers)
            if fault.kind in ("malformed", "drop"):
                # a break needs a reply to break: the rules give it, as to any request
                broken = BreakAfter(kind=fault.kind, chunks=fault.chunks)
            elif fault.kind == "slow":
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
        # a fault's outcome is written when it fires; a scripted break counts as an error
        outcome = None if fault is not None else ("served", "served")
        if broken is None and reply.break_after is not None:
            broken = reply.break_after
            outcome = (f"broken:{broken.kind}", "errors")
        if streamed:
            options = body.get("stream_options") or {}
            chunks = completion_chunks(
                completion, reply.chunk_size, bool(options.get("include_usage"))
            )
            events = self._stream(chunks, reply, broken, entry, generation, outcome)
            return Answer(events=events, headers=headers)
        # a whole reply: nothing of it can reach the client before it passes the gate
        if reply.hold_after is not None and not await self._wait(gate=reply.hold_after.gate):
            return STOPPING
        self._done(entry, generation, outcome)
        if broken is not None and broken.kind == "malformed":
            return Answer(raw=MALFORMED_BODY, headers=headers)
        return Answer(completion=completion, headers=headers, dropped=broken is not None)

    def _done(
        self, entry: dict[str, Any], generation: int, outcome: tuple[str, str] | None
    ) -> None:
        if outcome is not None:
            self._finish(entry, generation, *outcome)

    async def _stream(
        self,
        chunks: list[dict[str, Any]],
        reply: Reply,
        broken: BreakAfter | None,
        entry: dict[str, Any],
        generation: int,
        outcome: tuple[str, str] | None,
    ) -> AsyncIterator[dict[str, Any] | str]:
        """The events of a streamed reply: its chunks, paced, held at its gate, broken where
        it breaks, then ``[DONE]``. The server's stop drops a stream still waiting."""
        hold = reply.hold_after
        try:
            for sent in range(len(chunks) + 1):
                if hold is not None and sent == min(hold.chunks, len(chunks)):
                    if not await self._wait(gate=hold.gate):
                        raise DroppedConnection("the server stops")
                if broken is not None and sent == min(broken.chunks, len(chunks)):
                    self._done(entry, generation, outcome)
                    if broken.kind == "drop":
                        raise DroppedConnection("a scripted break")
                    yield MALFORMED_CHUNK
                    return
                if sent == len(chunks):
                    break
                if sent and reply.chunk_delay and not await self._wait(delay=reply.chunk_delay):
                    raise DroppedConnection("the server stops")
                with self._lock:  # `requests()` copies the entry under the lock
                    entry.setdefault("chunks_at", []).append(time.time())
                yield chunks[sent]
            self._done(entry, generation, outcome)
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away (a model call cancelled, say): its gate holds it no more
            with self._lock:
                if entry["outcome"] == "pending":
                    entry["outcome"] = "disconnected"
            raise


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
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return "Invalid type for 'stream_options': expected an object."
    if options is not None and not body.get("stream"):
        return "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    return None
