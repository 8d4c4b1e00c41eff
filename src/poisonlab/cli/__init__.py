"""The `poisonlab` command. Each command group lives in its own module and registers itself.

`main` is the one error boundary of every command (docs/design.md, "Errors"): a problem with the
user's input or environment is ONE line on stderr, `error: ...`, naming the file, key or value,
and exit code 2 — poisonlab's own errors, usage errors (an unknown option, a bad value), OSError
(naming the path), the run index's sqlite3 errors, MemoryError, YAML and safetensors errors.
Ctrl-C is one line and 130. Anything else is a bug in poisonlab: one line naming it and the path
of the saved traceback, exit code 1 — never a traceback on the terminal, never silence. The work
already done is kept by the code that did it (runs are marked interrupted or failed and resume).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

import torch
import typer
import yaml
from safetensors import SafetensorError
from typer import Abort, Exit

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - typer on the click package
    from click.exceptions import ClickException, UsageError

from poisonlab import __version__
from poisonlab.cli import audit, craft, data, run, runs, sweep
from poisonlab.errors import ConfigError, PoisonlabError, printable
from poisonlab.runs.layout import remove_unused_outputs
from poisonlab.runs.record import STOPPING, sigterm_to_interrupt

app = typer.Typer(
    name="poisonlab",
    help="Red-team and audit ML models against data poisoning, backdoors and membership inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Red-team and audit ML models against data poisoning, backdoors and membership inference."""


@app.command()
def version() -> None:
    """Print the poisonlab version."""
    print(__version__)


def _register_all() -> None:
    for module in (run, data, runs, audit, craft, sweep):
        module.register(app)


_register_all()


def check_values(command) -> None:
    """Every option and argument of `command` and its subcommands refuses NaN and ±inf (no
    comparison with NaN is ever true, so a NaN threshold or budget would pass every range check
    and silently change a verdict) and an empty value (`--out ""` is the current folder to a
    Path). One check on the values of every parameter, so no command can forget it (and none
    depends on how typer converts them)."""
    for param in getattr(command, "params", []):
        param.process_value = _checked(param, param.process_value)
    for sub in getattr(command, "commands", {}).values():
        check_values(sub)


def _checked(param, process_value):
    def process(ctx, value):
        name = param.opts[0] if getattr(param, "opts", None) else param.name
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, str) and not item.strip():
                raise ConfigError(f"{name} '': an empty value")
        value = process_value(ctx, value)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{name} {item}: not a finite number")
        return value

    return process


def one_line(text: str) -> str:
    """A message as one line: its lines joined with '; ', blank ones dropped, other control
    characters escaped."""
    return printable("; ".join(line.strip() for line in str(text).splitlines() if line.strip()))


def _os_message(exc: OSError) -> str:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or one_line(str(exc)) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an input or environment problem, or None for a bug."""
    if isinstance(exc, PoisonlabError):
        return one_line(str(exc))
    if isinstance(exc, UsageError):
        text = one_line(exc.format_message())  # empty when the help was printed instead
        where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        return text + where if text else ""
    if isinstance(exc, ClickException):
        return one_line(exc.format_message())
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, sqlite3.Error):
        return f"run index: {type(exc).__name__}: {one_line(str(exc))}"
    if isinstance(exc, MemoryError) or _allocation_failure(exc):
        return "out of memory" + (f": {one_line(str(exc))}" if str(exc) else "") + \
            " (use a smaller preset, model, batch or data subset)"
    if isinstance(exc, yaml.YAMLError):
        return f"invalid YAML: {one_line(str(exc))}"
    if isinstance(exc, SafetensorError):
        return f"invalid safetensors file: {one_line(str(exc))}"
    return None


def _allocation_failure(exc: BaseException) -> bool:
    """torch reports a failed allocation (a model or batch too large for the memory, a mapping
    the system refused) as RuntimeError, not MemoryError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "Cannot allocate memory" in text)


def _save_traceback(exc: BaseException) -> Path | None:
    """The traceback of an unexpected exception, written to a file; its path (None if not)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(exc))
    try:
        fd, name = tempfile.mkstemp(prefix=f"poisonlab-traceback-{stamp}-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"poisonlab {__version__}\nargv: {sys.argv}\n\n{text}")
    except OSError:
        return None
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (see the module docstring)."""
    code = 1
    STOPPING.clear()
    try:
        with _sigterm_as_interrupt(), _warnings_as_lines():
            code = _main(argv)
    finally:
        remove_unused_outputs(failed=code != 0)
    return code


@contextlib.contextmanager
def _warnings_as_lines():
    """A Python warning reaches the terminal as one `warning: MESSAGE` line, each message once
    (not as the source file, line number and code line of whoever raised it)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = one_line(" ".join(str(message).split()))
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends every command as Ctrl-C does (its clean-up runs, "error: interrupted"),
    not by the default action, which skipped it (a data decode's worker processes went on as
    orphans). Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    if not (sys.argv[1:] if argv is None else argv):
        argv = ["--help"]  # a bare `poisonlab` asks for the help: exit 0 (click's way is 2, silent)
    try:
        # inside the boundary: building the command takes seconds under load, and a SIGTERM or
        # Ctrl-C then must be "error: interrupted" too, not a traceback
        command = typer.main.get_command(app)
        check_values(command)
        code = command.main(args=argv, prog_name="poisonlab", standalone_mode=False)
        if isinstance(code, int) and code:  # typer turns Ctrl-C into exit code 130, returned
            if code == 130:
                print("error: interrupted", file=sys.stderr)
            return code
    except Exit as exc:  # --help, --version and the like
        return exc.exit_code
    except (KeyboardInterrupt, Abort):
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as exc:  # noqa: BLE001 - the one boundary: nothing escapes as a traceback
        message = user_error(exc)
        if message is not None:
            if message:
                print(f"error: {one_line(message)}", file=sys.stderr)
            return 2
        saved = _save_traceback(exc)
        where = f"; traceback saved to {saved}" if saved else ""
        print(f"error: internal error, {type(exc).__name__}: {one_line(str(exc))}{where} "
              "(please report it)", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """Console-script entry point."""
    exit_quietly(main())


def exit_quietly(code: int) -> None:
    """sys.exit(code); after a SIGTERM, one more during the interpreter's shutdown is ignored
    (its default action ended the process with 143 instead of 130)."""
    if STOPPING:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
