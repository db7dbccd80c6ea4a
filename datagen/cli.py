"""`paylater demo-data`: generate and advance the synthetic operational data."""

from __future__ import annotations

from datetime import date, timedelta

import typer

app = typer.Typer(no_args_is_help=True, help="Synthetic source data: generate, advance.")


def _database_failed(exc: Exception) -> None:
    """A source statement failed before anything was committed: one line, exit code 1."""
    from paylater.redaction import redact

    reason = redact(" ".join(f"{type(exc).__name__}: {exc}".split()))
    typer.echo(
        f"error: the source database failed ({reason}); nothing was written: run it again once"
        " that is fixed",
        err=True,
    )
    raise typer.Exit(code=1) from None  # the database error may quote a URL with its password


def _fail(exc: Exception) -> None:
    """One clear error line, exit code 1 (an invalid setting named by its environment variable)."""
    from paylater.cli import error_line  # imported here: paylater.cli imports this module

    typer.echo(f"error: {error_line(exc)}", err=True)
    raise typer.Exit(code=1) from exc


MAX_USERS = 1_000_000_000
"""More users than a prepaid card could have (numpy refuses arrays far beyond it anyway)."""
LATEST_END_DATE = date(9899, 12, 31)
"""Events (churn, repayments, birth years) are drawn decades past the last day: years 1 to 9999
must hold them."""


def _check_window(last_day: date, months: int) -> None:
    """Refuse a window the calendar cannot hold, naming the flags, before anything is written."""
    from datagen.generator import PRE_WINDOW_DAYS, window_start

    if last_day > LATEST_END_DATE:
        raise ValueError(
            f"--end-date {last_day} is too late: the simulation draws events decades after it,"
            f" past year 9999; use an end date up to {LATEST_END_DATE}"
        )
    try:
        window_start(last_day, months) - timedelta(days=PRE_WINDOW_DAYS)
    except (ValueError, OverflowError) as exc:  # a date before year 1
        raise ValueError(
            f"--months {months} before --end-date {last_day} (and {PRE_WINDOW_DAYS} days of"
            " earlier sign-ups) starts before year 1; use fewer months or a later end date"
        ) from exc


@app.command("generate")
def generate_command(
    users: int = typer.Option(
        1000, "--users", min=1, max=MAX_USERS, help="Users in the simulated world."
    ),
    months: int = typer.Option(12, "--months", min=1, help="Months of history to simulate."),
    seed: int | None = typer.Option(
        None, "--seed", min=0, help="Random seed (default: PAYLATER_SEED)."
    ),
    end_date: str | None = typer.Option(
        None,
        "--end-date",
        help="Last simulated business day, YYYY-MM-DD (default: yesterday in PAYLATER_TIMEZONE).",
    ),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a source that holds data."),
) -> None:
    """Simulate M months of history for N users into the source DB, the warehouse and the truth folder."""
    import duckdb

    from datagen.load import SourceNotEmpty, SourceUnavailable, database_errors
    from datagen.pipeline import GenerateIncomplete, generate_into
    from paylater.settings import get_settings
    from paylater.timeutil import resolve_as_of
    from tasks.warehouse import WarehouseError

    try:
        # Inside the try: an invalid PAYLATER_* variable is a ValidationError (a ValueError).
        settings = get_settings()
        last_day: date = resolve_as_of(end_date, "--end-date")
        _check_window(last_day, months)
        report = generate_into(
            users=users,
            months=months,
            seed=settings.seed if seed is None else seed,
            end_date=last_day,
            zone=settings.timezone,
            source_url=settings.source,
            warehouse_url=settings.warehouse,
            truth_dir=settings.truth_dir,
            replace=replace,
        )
    # duckdb.Error: the warehouse file held by another process (it is opened before any write).
    # GenerateIncomplete: the source committed, the rest did not; its message says to rerun.
    except (
        GenerateIncomplete,
        SourceNotEmpty,
        SourceUnavailable,
        WarehouseError,
        duckdb.Error,
        ValueError,
    ) as exc:
        _fail(exc)
        return
    except database_errors() as exc:
        _database_failed(exc)
        return
    # A folder it cannot create or write; a failure after the source commit is GenerateIncomplete.
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(
            f"error: cannot write{where}: {exc.strerror or exc}; nothing was written"
            " (PAYLATER_HOME and the backend URLs name where generate writes)",
            err=True,
        )
        raise typer.Exit(code=1) from exc
    except MemoryError as exc:
        typer.echo(
            f"error: --users {users} over --months {months} needs more memory than this machine"
            " has; nothing was written: use fewer users or months",
            err=True,
        )
        raise typer.Exit(code=1) from exc
    for line in report.lines():
        typer.echo(line)


@app.command("advance")
def advance_command(
    days: int = typer.Option(1, "--days", min=1, help="Business days to add after the latest one."),
) -> None:
    """Add the next day(s) of activity: new rows and status changes of old rows (repayments, defaults, refunds)."""
    import duckdb

    from datagen.load import SourceMoved, SourceNotEmpty, SourceUnavailable, database_errors
    from datagen.pipeline import AdvanceStopped, advance_into
    from paylater.settings import get_settings
    from tasks.warehouse import WarehouseError

    try:
        settings = get_settings()  # inside the try, as in generate
        report = advance_into(days, settings.source, settings.warehouse, settings.truth_dir)
    # ValueError includes StateDamaged (an unreadable state file) and a state of another world.
    except (
        AdvanceStopped,
        SourceMoved,
        SourceNotEmpty,
        SourceUnavailable,
        WarehouseError,
        duckdb.Error,
        FileNotFoundError,
        ValueError,
    ) as exc:
        _fail(exc)
        return
    except database_errors() as exc:
        _database_failed(exc)
        return
    for line in report.lines():
        typer.echo(line)
