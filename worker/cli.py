"""`paylater worker` and `paylater enqueue`: the asynchronous scoring worker."""

from __future__ import annotations

import typer


def run_worker() -> None:
    """Drain the scoring job table (not built yet)."""
    typer.echo("the scoring worker is not built yet", err=True)
    raise typer.Exit(2)


def enqueue() -> None:
    """Enqueue a scoring job (not built yet)."""
    typer.echo("the scoring worker is not built yet", err=True)
    raise typer.Exit(2)
