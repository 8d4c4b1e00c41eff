"""The `poisonlab` command's first step. Importing the CLI (torch, matplotlib) takes seconds; a
SIGTERM or Ctrl-C in that time used to end the process silently (SIGTERM's default action) or with
a traceback. Here both end as they do later: `error: interrupted`, exit code 130.

An interrupt raised inside a library's import can surface as another exception (numpy left half
imported recursed without end when torch touched it next), so once a signal has come, whatever
the import raised ends the same way."""

from __future__ import annotations

import signal
import sys

_signalled: list[int] = []


def _interrupt(signum, frame) -> None:
    _signalled.append(signum)
    raise KeyboardInterrupt


def entry() -> None:
    """Console-script entry point: the CLI, imported with SIGTERM and Ctrl-C as interrupts."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        from poisonlab.cli import main
    except BaseException:
        if not _signalled:
            raise
        main = None
    if _signalled:  # also when a library swallowed the KeyboardInterrupt
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    from poisonlab.cli import exit_quietly

    exit_quietly(main())
