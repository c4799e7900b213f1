"""The worker entry point: `python worker.py --agents mypkg.agents:AGENTS [--resources ...]`.

The same as `keel worker`: it serves the agents named `module:attribute` (or by KEEL_AGENTS)
on KEEL_TASK_QUEUE. A team's own worker adds `keel.KeelPlugin` instead (see examples/).
"""

from __future__ import annotations

import sys

from keel.client.cli import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]])
