"""The one fake OpenAI-compatible endpoint every system talks to, in a process of its own.

It is Keel's scripted model server (`keel.testing.model_server`) with the script computed
from the request instead of matched rule by rule (a K=300 conversation would otherwise scan
hundreds of rules per request): "count to K" gets a call to `add` until K tool results
follow the prompt, then the answer. For a tagged prompt (` #tag`) it prints
`A <time.monotonic()> <tag> <tool results>` on stdout when the request arrives, so the
harness knows when each run made progress (approval-to-resume, recovery after a kill). A
paced prompt (` over 300ms`) gets each reply written over that time: a streamed request its
chunks spread evenly over it, a whole one its reply once it has passed.

    python -m bench.fakemodel [--port 0] [--forget-every 5]   # prints "READY <base url>"
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from bench.conversation import PIECE, TOOL_NAME, Turn, read_turn
from keel.testing.model_server import (
    Reply,
    Rule,
    RuleSet,
    ScriptedModelServer,
    ToolCallSpec,
    build_completion,
)
from keel.testing.model_server.chunks import completion_chunks

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
            reply = Reply(content=turn.answer, delay=turn.delay)
        else:
            call = ToolCallSpec(name=TOOL_NAME, arguments={"a": turn.tool_results, "b": 1})
            reply = Reply(tool_calls=[call], delay=turn.delay)
        return None, paced(reply, turn, body), {}


CALL_PIECE = 2  # characters a streamed piece of a paced reply's tool call holds


def paced(reply: Reply, turn: Turn, body: Mapping[str, Any]) -> Reply:
    """The reply written over `turn.over` seconds, from its first chunk to its last (a story
    one piece a chunk); a request that does not stream waits that long for the whole."""
    if not turn.over:
        return reply
    if not body.get("stream"):
        return reply.model_copy(update={"delay": reply.delay + turn.over})
    size = len(PIECE.format(0)) if turn.pieces else CALL_PIECE
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = len(completion_chunks(build_completion(body, reply, {}), size, usage))
    return reply.model_copy(
        update={"chunk_size": size, "chunk_delay": turn.over / max(1, chunks - 1)}
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakemodel", description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--forget-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="clear the request log this often (0: never; the harness clears it itself)",
    )
    args = p.parse_args(argv)
    server = ScriptedModelServer(CountingScript(), port=args.port)
    server.start()
    print(f"READY {server.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        # the server logs every request body: forget them now and then, or a long benchmark
        # holds gigabytes of transcripts
        while not stop.wait(args.forget_every or None):
            server.reset()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
