"""`paylater bento`: import registry versions into the BentoML model store and build bentos."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, help="BentoML: import a registry version, build its bento.")


def _target(stage: str | None, version: str | None) -> str:
    """The one of --stage / --version given (production when neither)."""
    if stage and version:
        raise typer.BadParameter("give --stage or --version, not both")
    if stage and stage not in ("production", "staging"):
        raise typer.BadParameter(f"--stage must be production or staging, got {stage!r}")
    return version or stage or "production"


def load_or_exit(target: str, action: Callable[[], T]) -> T:
    """Run `action` (loading the model `target` names); a version, stage or tag that cannot be
    loaded is one error line, exit 1."""
    from bentos.build import unloadable

    try:
        return action()
    except Exception as exc:
        reason = unloadable(exc)
        if reason is None:
            raise
        typer.echo(f"error: cannot load model {target!r}: {reason}", err=True)
        raise typer.Exit(1) from exc


@app.command("import")
def import_cmd(
    stage: str | None = typer.Option(None, help="Registry stage: production or staging."),
    version: str | None = typer.Option(None, help="Registry version number."),
) -> None:
    """Save a registry version into the BentoML model store as paylater-default:<version>."""
    from bentos.build import import_version, resolve_version

    target = _target(stage, version)
    tag = load_or_exit(target, lambda: import_version(resolve_version(target)))
    typer.echo(tag)


@app.command("build")
def build_cmd(
    stage: str | None = typer.Option(None, help="Registry stage: production or staging."),
    version: str | None = typer.Option(None, help="Registry version number."),
) -> None:
    """Build paylater-scorer:<version> (importing the model first when missing)."""
    from bentoml.exceptions import BentoMLException

    from bentos.build import BENTO_NAME, build_bento, resolve_version

    target = _target(stage, version)
    number = load_or_exit(target, lambda: resolve_version(target))
    try:
        tag = load_or_exit(target, lambda: build_bento(number))
    except BentoMLException as exc:  # the build itself (packages not lockable, a bad bentofile)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        typer.echo(f"error: building {BENTO_NAME}:{number} failed: {reason}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(tag)
    typer.echo(f"serve it with: bentoml serve {tag} --host 127.0.0.1 --port 3000")
