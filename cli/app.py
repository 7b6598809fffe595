"""The typer app every command registers on, and how a command reports a user's error:
one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from edgezo.errors import EdgezoError, RunInterrupted

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Forward-only (zeroth-order) fine-tuning of LLMs on small machines.")
profiles_app = typer.Typer(no_args_is_help=True, help="List and show device profiles.")
app.add_typer(profiles_app, name="profiles")
err_console = Console(stderr=True)


def user_errors(fn):
    """Print an EdgezoError as `error: ...` and exit 2; a Ctrl-C exits 130, the shell's
    code for SIGINT (a run has said where it stopped first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgezoError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            raise typer.Exit(2) from None
        except RunInterrupted:
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            err_console.print("Stopped (Ctrl-C).")
            raise typer.Exit(130) from None

    return wrapper
