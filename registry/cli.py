"""`paylater registry`: the model registry policy on MLflow."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True, help="Model registry: list, show, promote, rollback, history."
)
