"""Small pieces shared by the `fwdata` and `fwmodel` command lines: version flag, user errors."""

from __future__ import annotations

from typing import NoReturn, Optional

import typer
from rich.console import Console

from fwdata import __version__

# Exit codes, documented in docs/CLI.md.
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran, but some inputs / checks failed
EXIT_USAGE = 2  # bad options, missing paths, unreadable config: nothing was done

err_console = Console(stderr=True)


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad config, missing weights).

    Commands print its message on one line and exit with EXIT_USAGE instead of a traceback.
    """


def version_callback(value: Optional[bool]) -> None:
    if value:
        typer.echo(f"fantasyworld-data {__version__}")
        raise typer.Exit(EXIT_OK)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` to stderr and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
