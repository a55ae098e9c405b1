"""Turn exceptions into one clear line plus a hint; a traceback only with RESIDLAB_DEBUG=1."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from residlab.core.errors import ResidlabError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a CLI command so that failures print ``error: ...`` and ``hint: ...`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ResidlabError as err:
            if os.environ.get("RESIDLAB_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(err.message)}", markup=True)
            # every error carries a hint; this fallback only covers one raised without it
            hint = err.hint or "check the value named above; `--help` lists each option and what it takes."
            err_console.print(f"[yellow]hint:[/] {escape(hint)}", markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; anything already written is kept.")
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("RESIDLAB_DEBUG"):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            err_console.print(f"[bold red]error:[/] unexpected {type(err).__name__}: {escape(first)}", markup=True)
            err_console.print(
                "[yellow]hint:[/] rerun with RESIDLAB_DEBUG=1 for the full traceback, and report it.", markup=True
            )
            raise typer.Exit(1) from None

    return wrapper


# typer >= 0.20 carries its own copy of click; older ones use click itself: take the exception classes
# from wherever typer's own BadParameter lives.
_usage = sys.modules[typer.BadParameter.__module__]
_UsageError: type[Exception] = _usage.UsageError
_NoArgsIsHelp: type[Exception] | None = getattr(_usage, "NoArgsIsHelpError", None)


class ResidlabGroup(TyperGroup):
    """The top-level command group: a usage mistake caught by the option parser itself (a value out of
    range, a missing argument, an unknown option) is reported like every other user error, as one
    ``error:`` line and a ``hint:``, exit code 2, instead of click's usage box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except _UsageError as err:
            ctx = getattr(err, "ctx", None)
            if _NoArgsIsHelp is not None and isinstance(err, _NoArgsIsHelp) and ctx is not None:
                print(ctx.get_help())
                sys.exit(2)
            command = ctx.command_path if ctx is not None else "residlab"
            err_console.print(f"[bold red]error:[/] {escape(err.format_message())}", markup=True)  # type: ignore[attr-defined]
            err_console.print(f"[yellow]hint:[/] see `{command} --help`.", markup=True)
            sys.exit(2)
        except typer.Abort:
            err_console.print("interrupted; anything already written is kept.")
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)
