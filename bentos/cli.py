"""`paylater bento`: import registry versions into the BentoML model store and build bentos."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="BentoML: import a registry version, build its bento.")
