"""``python -m keel.testing.model_server``: serve a rules file in the foreground."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
