"""The command line: ``python -m keel.testing.model_server --rules FILE --host H --port P``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .rules import SUPPORT_RULES, RulesError, RuleSet
from .server import ScriptedModelServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keel.testing.model_server",
        description="Serve a scripted model over the OpenAI Chat Completions API.",
    )
    parser.add_argument(
        "--rules", default=str(SUPPORT_RULES), help="rules JSON file (default: %(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind (%(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every HTTP request")
    args = parser.parse_args(argv)
    if args.verbose:  # the server logs through `logging`, and configures none of its own
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rules = RuleSet.load(args.rules)
    except RulesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = ScriptedModelServer(rules, host=args.host, port=args.port, verbose=args.verbose)
    try:
        server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"Scripted model server listening on {server.base_url} "
        f"({len(rules.rules)} rules from {args.rules}); Ctrl-C to stop",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    stats = server.stats()
    print(
        f"stopped after {stats['requests']} requests "
        f"({stats['served']} served, {stats['faults']} faults)",
        flush=True,
    )
    return 0
