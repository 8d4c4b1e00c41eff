"""The `poisonlab` command. Each command group lives in its own module and registers itself."""

from __future__ import annotations

import sys

import typer

from poisonlab import __version__
from poisonlab.cli import audit, craft, data, run, runs, sweep
from poisonlab.errors import PoisonlabError

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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: user errors are one line on stderr and code 2."""
    try:
        app(args=argv, prog_name="poisonlab")
    except PoisonlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # typer's standalone mode ends every command with SystemExit
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
