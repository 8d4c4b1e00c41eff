"""The `poisonlab` command's first step. Importing the CLI (torch, matplotlib) takes seconds; a
SIGTERM or Ctrl-C in that time used to end the process silently (SIGTERM's default action) or with
a traceback. Here both end as they do later: `error: interrupted`, exit code 130."""

from __future__ import annotations

import signal
import sys


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def entry() -> None:
    """Console-script entry point: the CLI, imported with SIGTERM as an interrupt."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        from poisonlab.cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGTERM, previous)
    sys.exit(main())
