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


def _flags_show_as_flags() -> None:
    """`--help` shows a flag (`--quiet`, `--x/--no-x`) without a value type.

    typer's rich help prints the type of every option, `<bool>` for flags too, as if they took a
    value (its plain-text help already leaves it out for flags). Both command lines import this
    module, so every command, present and future, gets the fix; tests/test_cli_output.py checks it.
    """
    try:
        from typer.core import TyperOption
    except ImportError:  # another typer layout: its help may show `<bool>`, the commands still work
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_fw_flags", False):
        return

    def display_type_rich(self, ctx):
        if self.is_flag or self.count:
            return None
        return original(self, ctx)

    display_type_rich._fw_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_as_flags()


def reflow_help(app: typer.Typer) -> None:
    """Each command's docstring as its help, with the source line breaks inside a paragraph removed.

    typer's rich help keeps a docstring's line breaks, so a paragraph wrapped at 100 columns in the
    source shows with stray short lines in an 80-column terminal; joined, rich wraps it to the
    terminal. Paragraphs (blank-line separated) stay paragraphs. Call it once, after the commands.
    """
    import inspect

    for info in app.registered_commands:
        if info.help is None and info.callback is not None and inspect.getdoc(info.callback):
            info.help = "\n\n".join(" ".join(p.split()) for p in inspect.getdoc(info.callback).split("\n\n"))
    for group in app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


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
