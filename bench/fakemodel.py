"""The one fake OpenAI-compatible endpoint every system talks to, in a process of its own.

It is Keel's scripted model server (`keel.testing.model_server`) with the script computed
from the request instead of matched rule by rule (a K=300 conversation would otherwise scan
hundreds of rules per request): "count to K" gets a call to `add` until K tool results
follow the prompt, then the answer. For a tagged prompt (` #tag`) it prints
`A <time.monotonic()> <tag> <tool results>` on stdout when the request arrives, so the
harness knows when each run made progress (approval-to-resume, recovery after a kill).

    python -m bench.fakemodel [--port 0]      # prints "READY <base url>" once listening
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from bench.conversation import TOOL_NAME, answer, read_turn
from keel.testing.model_server import Reply, Rule, RuleSet, ScriptedModelServer, ToolCallSpec

_print_lock = threading.Lock()
NO_PROMPT = Reply(content="no scripted reply")


class CountingScript(RuleSet):
    """The script of the "count to K" conversation, for any K, in O(messages) per request."""

    def select(self, body: Mapping[str, Any]) -> tuple[Rule | None, Reply, dict[str, str]]:
        arrived = time.monotonic()
        messages = body.get("messages") or []
        turn = read_turn(messages) if isinstance(messages, list) else None
        if turn is None:
            return None, NO_PROMPT, {}
        if turn.tag:
            with _print_lock:
                sys.stdout.write(f"A {arrived:.6f} {turn.tag} {turn.tool_results}\n")
                sys.stdout.flush()
        if turn.done:
            reply = Reply(content=answer(turn.k), delay=turn.delay)
        else:
            call = ToolCallSpec(name=TOOL_NAME, arguments={"a": turn.tool_results, "b": 1})
            reply = Reply(tool_calls=[call], delay=turn.delay)
        return None, reply, {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakemodel", description=__doc__)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    server = ScriptedModelServer(CountingScript(), port=args.port)
    server.start()
    print(f"READY {server.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        # the server logs every request body: forget them now and then, or a long benchmark
        # holds gigabytes of transcripts
        while not stop.wait(5.0):
            server.reset()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
