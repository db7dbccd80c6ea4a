"""Backfill: the daily pipeline over a date range, idempotent and resumable.

Each day is the same `daily_pipeline` a schedule runs. Days run oldest first; a day whose sync
ledger is complete, whose training and scoring datasets exist and whose features (or a later
day's) the online table holds is skipped, so a backfill that
stopped on a failure resumes where it stopped when run again with the same range.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import date, timedelta

DEPLOYMENT = "daily-pipeline/daily-pipeline"


class BackfillError(RuntimeError):
    """A backfill day failed; the message says which and how to resume."""


@dataclass(frozen=True)
class DayOutcome:
    """What happened to one day of a backfill."""

    as_of: date
    status: str  # 'skipped' | 'completed' | 'failed'
    detail: str = ""


def days(start: date, end: date) -> Iterator[date]:
    """Every date from `start` to `end`, both included; ValueError when the range is empty."""
    if end < start:
        raise ValueError(f"--end {end} is before --start {start}")
    day = start
    while day <= end:
        yield day
        day += timedelta(days=1)


def day_is_complete(as_of: date) -> bool:
    """Whether the sync ledger, both datasets and the online publish of `as_of` are complete."""
    from paylater.settings import get_settings
    from tasks.datasets import DatasetError, read_manifest
    from tasks.storage import open_storage
    from tasks.sync import SyncError, check_ledger
    from tasks.warehouse import open_warehouse

    settings = get_settings()
    warehouse = open_warehouse(settings.warehouse)
    try:
        if not warehouse.table_exists("sync_ledger"):
            return False
        check_ledger(warehouse, as_of)
    except SyncError:
        return False
    finally:
        warehouse.close()
    storage = open_storage(settings=settings)
    try:
        read_manifest(storage, "training", as_of)
        read_manifest(storage, "scoring", as_of)
    except DatasetError:
        return False
    return online_features_cover(as_of)


def online_features_cover(as_of: date) -> bool:
    """Whether the online table holds the features of `as_of` or of a later day.

    A pipeline that died at the publish leaves its ledger and datasets complete; skipped, its day
    would leave the service scoring with the features of the day before. An older day's publish
    leaves the table as it is (it holds a later day), so a backfilled day is complete without it.
    """
    from tasks.online import last_published

    published = last_published()
    return published is not None and published.as_of is not None and published.as_of >= as_of


def run_in_process(as_of: date) -> str:
    """Run the daily pipeline for one day in this process."""
    from flows.daily_pipeline import daily_pipeline

    result = daily_pipeline(as_of)
    return f"{result}"


def run_through_deployment(as_of: date, timeout_s: float = 3600) -> str:
    """Run the `daily-pipeline` deployment for one day and wait for its final state."""
    import httpx
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from paylater.redaction import redact

    try:
        flow_run = run_deployment(
            DEPLOYMENT, parameters={"as_of": as_of.isoformat()}, timeout=timeout_s
        )
    except httpx.TransportError as exc:  # whose message names nothing ("Connection refused")
        api = redact(PREFECT_API_URL.value() or "the ephemeral API")
        raise BackfillError(
            f"cannot reach the Prefect API at {api} ({type(exc).__name__}: {redact(str(exc))}):"
            " start the server or point PREFECT_API_URL at it; a run it had already started for"
            f" {as_of} may still be going (prefect flow-run ls) before the backfill is run again"
        ) from None
    except ObjectNotFound as exc:  # whose own message is "None"
        raise BackfillError(
            f"deployment {DEPLOYMENT} not found on the Prefect API: create it with "
            "`prefect --no-prompt deploy --all` from the repository root, or run the backfill "
            "--in-process"
        ) from exc
    assert isinstance(
        flow_run, FlowRun
    )  # called from sync code: run_deployment does not return a coroutine
    state = flow_run.state
    if state is None or not state.is_final():
        # run_deployment gave up waiting; the run itself goes on (or waits for a worker), and
        # starting the day again now would run it twice.
        raise BackfillError(
            f"flow run {flow_run.name} is still {state.name if state else 'without a state'} "
            f"after {timeout_s:.0f} s; the backfill stopped waiting for it: let it finish or "
            "cancel it (is a worker running?) before running the backfill again"
        )
    if not state.is_completed():
        raise BackfillError(f"flow run {flow_run.name} ended {state.name}: {state.message or ''}")
    return f"flow run {flow_run.name} completed"


def _one_line(exc: BaseException) -> str:
    """An error as `Type: message` on one line (driver messages span several)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def backfill(
    start: date,
    end: date,
    run_day: Callable[[date], str],
    concurrency: int = 1,
    force: bool = False,
    is_complete: Callable[[date], bool] = day_is_complete,
    report: Callable[[DayOutcome], None] = lambda _: None,
) -> list[DayOutcome]:
    """Run `run_day` for every incomplete day, at most `concurrency` at once, oldest first.

    Stops submitting after the first failure (later days may depend on it) and raises
    BackfillError naming it; days already done are skipped on the next run.
    """
    from tasks.storage import StorageError
    from tasks.warehouse import WarehouseError

    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    outcomes: list[DayOutcome] = []
    pending: dict[Future[str], date] = {}
    failed: list[DayOutcome] = []

    def settle(done: set[Future[str]]) -> None:
        for future in done:
            day = pending.pop(future)
            exc = future.exception()
            outcome = (
                DayOutcome(day, "failed", _one_line(exc))
                if exc
                else DayOutcome(day, "completed", future.result())
            )
            (failed if exc else outcomes).append(outcome)
            report(outcome)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for day in days(start, end):
            # Wait for a free slot before the check, which opens the warehouse: at concurrency 1
            # it must not overlap the running day (a DuckDB file admits one writer process).
            while len(pending) >= concurrency:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                settle(done)
            # Collect days that ended meanwhile too: a failure already known must stop the next
            # day even while a slot is free (a check of a complete day took that long).
            settle({future for future in pending if future.done()})
            if failed:
                break
            try:
                complete = not force and is_complete(day)
            except (ValueError, WarehouseError, StorageError):
                raise  # a misconfiguration, the same for every day: one error line
            except Exception as exc:  # e.g. a DuckDB warehouse another process holds
                # Stop as a failed day does, so the days already run are still reported.
                outcome = DayOutcome(day, "failed", f"checking it: {_one_line(exc)}")
                failed.append(outcome)
                report(outcome)
                break
            if complete:
                outcome = DayOutcome(day, "skipped", "already complete")
                outcomes.append(outcome)
                report(outcome)
                continue
            pending[pool.submit(run_day, day)] = day
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            settle(done)
    if failed:
        first = min(failed, key=lambda o: o.as_of)
        resume = (
            # --force reruns every day: the same command would redo the days before the failure.
            f"run it again with --start {first.as_of} to resume from there"
            if force
            else f"run the same command again to resume from {first.as_of} "
            "(completed days are skipped)"
        )
        raise BackfillError(
            f"backfill stopped: {first.as_of} failed ({first.detail}); fix it and {resume}"
        )
    return sorted(outcomes, key=lambda o: o.as_of)
