"""Turn exceptions into one clear line plus a hint; a traceback only with RESIDLAB_DEBUG=1."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

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
            err_console.print(f"[bold red]error:[/] {err.message}", markup=True)
            if err.hint:
                err_console.print(f"[yellow]hint:[/] {err.hint}", markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; anything already written is kept.")
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("RESIDLAB_DEBUG"):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            err_console.print(f"[bold red]error:[/] unexpected {type(err).__name__}: {first}", markup=True)
            err_console.print(
                "[yellow]hint:[/] rerun with RESIDLAB_DEBUG=1 for the full traceback, and report it.", markup=True
            )
            raise typer.Exit(1) from None

    return wrapper
