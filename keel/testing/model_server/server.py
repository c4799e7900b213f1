"""``ScriptedModelServer``: lifecycle, admin operations, fault state and the chat endpoint."""

from __future__ import annotations

import copy
import errno
import json
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .completions import _MALFORMED_BODY, _HttpReply, build_completion
from .handler import _HTTPServer
from .matching import _Conversation, _substitute_text
from .rules import FaultSpec, RuleSet, parse_faults


class ServerBindError(OSError):
    """The server could not bind its address; the message names host and port."""


class PortInUseError(ServerBindError):
    """The port is already taken."""


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


class ScriptedModelServer:
    """The scripted model on a background ``ThreadingHTTPServer``.

    >>> with ScriptedModelServer(RuleSet.load(TEST_RULES)) as server:
    ...     client = AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0)
    """

    def __init__(
        self,
        rules: RuleSet,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        verbose: bool = False,
    ) -> None:
        self._rules = rules
        self._host = host
        self._requested_port = port
        self.verbose = verbose
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requests = 0
        self._served = 0
        self._faults_count = 0
        self._errors = 0
        self._generation = 0
        self._log: list[dict[str, Any]] = []
        self._faults: list[_FaultState] = [_FaultState.of(f) for f in rules.faults]
        self._gates: dict[str, threading.Event] = {}
        self._held: dict[str, int] = {}

    # ---- lifecycle

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises PortInUseError if the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("scripted model server already started")
        self._stopping.clear()
        try:
            httpd = _HTTPServer((self._host, self._requested_port), self)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                msg = (
                    f"cannot start the scripted model server: port {self._requested_port} "
                    f"on {self._host} is already in use; choose another port"
                )
            else:
                msg = (
                    f"cannot start the scripted model server on "
                    f"{self._host}:{self._requested_port}: {e.strerror or e}"
                )
            error = PortInUseError if e.errno == errno.EADDRINUSE else ServerBindError
            exc = error(msg)
            exc.errno = e.errno
            raise exc from e
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"scripted-model-server:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; replies still sleeping (delays, slow faults) are dropped."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ScriptedModelServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the requested one."""
        if self._httpd is not None:
            return int(self._httpd.server_address[1])
        return self._requested_port

    @property
    def root_url(self) -> str:
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"{self.root_url}/v1"

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rules (active faults are kept)."""
        self._rules = rules

    # ---- admin

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

    def _gate(self, name: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        """Open the gate `name`: replies held at it go out, later ones pass straight on."""
        self._gate(name).set()

    def close_gate(self, name: str) -> None:
        """Close the gate `name` again: replies that reach it wait for the next release."""
        self._gate(name).clear()

    def held(self, name: str) -> int:
        """How many requests are waiting at the gate `name` right now."""
        with self._lock:
            return self._held.get(name, 0)

    def _wait_at_gate(self, name: str) -> bool:
        """Wait until the gate opens; False when the server stops first."""
        gate = self._gate(name)
        with self._lock:
            self._held[name] = self._held.get(name, 0) + 1
        try:
            while not gate.wait(0.05):
                if self._stopping.is_set():
                    return False
            return True
        finally:
            with self._lock:
                self._held[name] -= 1

    def reset(self) -> None:
        """Clear counters, the request log and the active faults."""
        with self._lock:
            self._requests = self._served = self._faults_count = self._errors = 0
            self._log = []
            self._faults = []
            self._generation += 1  # requests still in flight no longer count

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

    def _chat(self, raw: bytes) -> _HttpReply | None:
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

        problem: str | None = None
        if not parsed:
            problem = (
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)"
            )
        elif not isinstance(body, dict):
            problem = "Invalid request: the body must be a JSON object."
        elif not isinstance(body.get("messages"), list) or not all(
            isinstance(m, dict) for m in body["messages"]
        ):
            problem = "Invalid request: 'messages' must be a list of message objects."
        elif body.get("stream"):
            problem = "Invalid request: streaming is not supported by the scripted model server."
        if problem is not None:
            self._finish(entry, generation, "error:400", "errors")
            return _HttpReply.error(400, problem, headers=headers)

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
                return _HttpReply(200, _MALFORMED_BODY, headers)
            if fault.kind == "slow":
                if self._stopping.wait(fault.delay):
                    return None
            else:
                status = int(fault.kind)
                if fault.retry_after is not None and status in (429, 503):
                    ra = fault.retry_after
                    headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
                if fault.should_retry is not None:
                    headers["x-should-retry"] = "true" if fault.should_retry else "false"
                return _HttpReply.error(status, fault.message, headers=headers)

        rule, reply, captures = self._rules.select(body)
        with self._lock:
            entry["rule"] = rule.name if rule is not None else "default"
        if reply.hold is not None and not self._wait_at_gate(reply.hold):
            return None
        if reply.delay and self._stopping.wait(reply.delay):
            return None
        if reply.error is not None:
            err = reply.error
            if fault is None:
                self._finish(entry, generation, f"error:{err.status}", "errors")
            return _HttpReply.error(
                err.status, _substitute_text(err.message, captures), err.type, err.code, headers
            )
        completion = build_completion(body, reply, captures)
        if fault is None:
            self._finish(entry, generation, "served", "served")
        return _HttpReply.json(200, completion, headers)
