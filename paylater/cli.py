"""The `paylater` command: what Prefect, MLflow and BentoML do not already cover."""

from __future__ import annotations

import os
import re
from typing import Any

import typer
from typer.core import TyperGroup

from bentos.cli import app as bento_app
from datagen.cli import app as demo_data_app
from registry.cli import app as registry_app
from worker.cli import enqueue, run_worker


class _SettingsErrorsAsOneLine(TyperGroup):
    """Every subcommand: an invalid PAYLATER_* variable met anywhere in it is one error line."""

    # typer.Context is the public name of the context typer's privately vendored click passes.
    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        """Run the subcommand; a settings error it did not report itself ends it here."""
        from pydantic import ValidationError
        from pydantic_settings import SettingsError

        try:
            return super().invoke(ctx)
        # Commands that read settings outside their own error handling (worker, enqueue) let
        # pydantic's multi-line report through otherwise.
        except (ValidationError, SettingsError) as exc:
            if isinstance(exc, ValidationError) and exc.title != "Settings":
                raise  # another model's error: its fields are no environment variables
            typer.echo(f"error: {error_line(exc)}", err=True)
            raise typer.Exit(1) from exc


app = typer.Typer(
    cls=_SettingsErrorsAsOneLine, no_args_is_help=True, add_completion=False, help=__doc__
)
app.add_typer(demo_data_app, name="demo-data")
app.add_typer(registry_app, name="registry")
app.add_typer(bento_app, name="bento")
app.command("worker")(run_worker)
app.command("enqueue")(enqueue)


def error_line(exc: Exception) -> str:
    """What is wrong, on one line; an invalid setting is named by its environment variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from paylater.redaction import redact

    # The value echoed back is redacted: a mistyped setting may hold a URL with its password.
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{_variable(str(err['loc'][0]))}: {err['msg']}{_ACCEPTED.get(err['type'], '')}"
            f" (got {redact(repr(err['input']))})"
            for err in exc.errors()
        )
    if isinstance(exc, SettingsError) and (field := _UNPARSED_FIELD.search(str(exc))):
        # A list or map setting that is not JSON: pydantic-settings names only the field.
        variable = _variable(field.group(1))
        return redact(
            f"{variable}: not valid JSON ({exc.__cause__ or exc}) "
            f"(got {os.environ.get(variable)!r})"
        )
    return " ".join(str(exc).split())


_UNPARSED_FIELD = re.compile(r'error parsing value for field "(\w+)"')

_ACCEPTED = {"bool_parsing": ": use true or false (also 1/0, yes/no, on/off)"}
"""What to write instead, for errors whose message names no accepted value."""


def _variable(field: str) -> str:
    """The environment variable of a settings field (aliases such as MLFLOW_TRACKING_URI stay)."""
    return field if field.isupper() else f"PAYLATER_{field.upper()}"


@app.command("backfill")
def backfill_command(
    start: str = typer.Option(..., "--start", help="First as_of, YYYY-MM-DD."),
    end: str = typer.Option(..., "--end", help="Last as_of, YYYY-MM-DD (included)."),
    deployment: bool = typer.Option(
        False,
        "--deployment/--in-process",
        help="Run each day through the daily-pipeline deployment (a worker must be running) or here.",
    ),
    concurrency: int = typer.Option(
        1,
        "--concurrency",
        help="Days in flight at once. Keep 1 on a DuckDB warehouse (one writer process).",
    ),
    force: bool = typer.Option(False, "--force", help="Rerun days that are already complete."),
) -> None:
    """Run the daily pipeline for every day from --start to --end; rerun to resume."""
    from paylater import backfill as bf
    from paylater.settings import get_settings
    from paylater.timeutil import default_as_of, resolve_as_of
    from tasks.storage import StorageError
    from tasks.warehouse import WarehouseError

    try:
        first, last = resolve_as_of(start, "--start"), resolve_as_of(end, "--end")
        latest = default_as_of()
        if last > latest:
            # A sync refuses a day that has not ended; say so before running the earlier days.
            raise ValueError(
                f"--end {last} has not ended yet in {get_settings().timezone}; "
                f"the latest day a backfill can run is {latest}"
            )
        run_day = bf.run_through_deployment if deployment else bf.run_in_process
        outcomes = bf.backfill(
            first,
            last,
            run_day,
            concurrency=concurrency,
            force=force,
            report=lambda o: typer.echo(f"{o.as_of} {o.status} {o.detail}".rstrip()),
        )
    except (ValueError, bf.BackfillError, WarehouseError, StorageError) as exc:
        typer.echo(f"error: {error_line(exc)}", err=True)
        raise typer.Exit(1) from exc
    done = sum(o.status == "completed" for o in outcomes)
    typer.echo(f"backfill {first}..{last}: {done} run, {len(outcomes) - done} already complete")


@app.command("settings")
def show_settings(
    reference: bool = typer.Option(
        False, "--reference", help="Print every setting (docs/settings.md) instead."
    ),
) -> None:
    """Print the backends this environment resolves to (passwords masked)."""
    from paylater.redaction import redact
    from paylater.settings import get_settings

    if reference:
        from paylater.settings_doc import reference_markdown

        typer.echo(reference_markdown(), nl=False)
        return

    try:
        s = get_settings()
    except ValueError as exc:
        typer.echo(f"error: {error_line(exc)}", err=True)
        raise typer.Exit(1) from exc
    for name, value in [
        ("home", s.home_dir),
        ("source", redact(s.source)),
        ("warehouse", redact(s.warehouse)),
        ("datasets", redact(s.datasets)),
        ("mlflow", redact(s.tracking_uri)),
        ("timezone", s.timezone),
        ("queue", _queue_line(s.worker_database_url, s.source)),
    ]:
        typer.echo(f"{name:10} {value}")


def _queue_line(worker_database_url: str | None, source: str) -> str:
    """The queue database (scoring_jobs, where the runbook's SQL runs), masked; says when it is
    the source by default, and when that cannot hold the queue."""
    from paylater.redaction import redact
    from worker.queue import NotPostgres, require_postgres

    url = worker_database_url or source
    notes = [] if worker_database_url else ["default: the source"]
    try:
        require_postgres(url)
    except NotPostgres:
        notes.append("not PostgreSQL: set PAYLATER_WORKER_DATABASE_URL")
    return redact(url) + (f" ({'; '.join(notes)})" if notes else "")


if __name__ == "__main__":
    app()
