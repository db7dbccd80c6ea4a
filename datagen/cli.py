"""`paylater demo-data`: generate and advance the synthetic operational data."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Synthetic source data: generate, advance.")
