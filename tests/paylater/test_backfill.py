"""Backfill: oldest first, skips completed days, stops on failure, resumes, respects concurrency."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import date
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest

from paylater.backfill import BackfillError, backfill, days

P = ParamSpec("P")
T = TypeVar("T")

D1, D5 = date(2026, 11, 1), date(2026, 11, 5)


def test_days_inclusive_and_empty_range_rejected() -> None:
    assert list(days(D1, date(2026, 11, 3))) == [D1, date(2026, 11, 2), date(2026, 11, 3)]
    with pytest.raises(ValueError, match="before --start"):
        list(days(D5, D1))


def test_runs_incomplete_days_in_order_and_skips_complete_ones() -> None:
    done = {date(2026, 11, 2)}
    ran: list[date] = []

    def run(day: date) -> str:
        ran.append(day)
        done.add(day)
        return "ok"

    outcomes = backfill(D1, D5, run, is_complete=lambda d: d in done)
    assert ran == [D1, date(2026, 11, 3), date(2026, 11, 4), D5]
    assert [o.status for o in outcomes] == [
        "completed",
        "skipped",
        "completed",
        "completed",
        "completed",
    ]


def test_failure_stops_and_rerun_resumes_from_the_failed_day() -> None:
    done: set[date] = set()
    broken = {date(2026, 11, 3)}
    ran: list[date] = []

    def run(day: date) -> str:
        ran.append(day)
        if day in broken:
            raise RuntimeError("warehouse unreachable")
        done.add(day)
        return "ok"

    with pytest.raises(BackfillError, match=r"2026-11-03 failed .*warehouse unreachable.*resume"):
        backfill(D1, D5, run, is_complete=lambda d: d in done)
    assert ran == [D1, date(2026, 11, 2), date(2026, 11, 3)]  # nothing after the failure

    broken.clear()
    ran.clear()
    outcomes = backfill(D1, D5, run, is_complete=lambda d: d in done)
    assert ran == [date(2026, 11, 3), date(2026, 11, 4), D5]
    assert [o.status for o in outcomes][:2] == ["skipped", "skipped"]


def test_forced_backfill_says_to_resume_from_the_failed_day() -> None:
    """--force reruns every day, so the same command would redo the days before the failure."""

    def run(day: date) -> str:
        if day == date(2026, 11, 3):
            raise RuntimeError("warehouse unreachable")
        return "ok"

    with pytest.raises(BackfillError) as failure:
        backfill(D1, D5, run, force=True, is_complete=lambda d: True)
    assert "--start 2026-11-03" in str(failure.value)
    assert "completed days are skipped" not in str(failure.value)


def test_concurrency_limit_is_respected() -> None:
    lock = threading.Lock()
    in_flight = peak = 0

    def run(day: date) -> str:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return "ok"

    outcomes = backfill(D1, date(2026, 11, 10), run, concurrency=3, is_complete=lambda d: False)
    assert len(outcomes) == 10
    assert peak == 3


def test_next_day_is_checked_only_once_the_running_day_finished() -> None:
    """The completeness check opens the warehouse; with --deployment the running day is another
    process, and a DuckDB file admits one process: at concurrency 1 they must not overlap."""
    d2 = date(2026, 11, 2)
    checked = {D1: threading.Event(), d2: threading.Event()}
    finished: set[date] = set()
    unfinished_at_check: dict[date, set[date]] = {}

    def is_complete(day: date) -> bool:
        unfinished_at_check[day] = {d for d in checked if d < day} - finished
        checked[day].set()
        return False

    def run(day: date) -> str:
        if day == D1:
            # Released at once by a check of the next day made while this day still runs.
            checked[d2].wait(timeout=1)
        finished.add(day)
        return "ok"

    backfill(D1, d2, run, is_complete=is_complete)
    assert unfinished_at_check == {D1: set(), d2: set()}


def test_force_reruns_complete_days() -> None:
    ran: list[date] = []

    def run(day: date) -> str:
        ran.append(day)
        return "ok"

    backfill(D1, D1, run, force=True, is_complete=lambda d: True)
    assert ran == [D1]
    with pytest.raises(ValueError, match="concurrency"):
        backfill(D1, D1, lambda d: "ok", concurrency=0)


def test_deployment_run_still_going_after_the_timeout_is_not_called_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_deployment returns a run that is still Running when its timeout passes: the day is
    not over, and running the same command again would start it a second time."""
    import uuid

    import prefect.deployments
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Running

    from paylater.backfill import run_through_deployment

    still_running = FlowRun(flow_id=uuid.uuid4(), name="calm-otter", state=Running())
    monkeypatch.setattr(prefect.deployments, "run_deployment", lambda *a, **kw: still_running)
    with pytest.raises(BackfillError) as failure:
        run_through_deployment(D1, timeout_s=60)
    message = str(failure.value)
    assert "still Running" in message and "ended" not in message
    assert "calm-otter" in message


def test_no_day_starts_once_an_earlier_day_is_known_to_have_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrency 2: day 1 fails while day 2 (complete) is being checked; day 3 must not start,
    although a slot is free (the failed day's future had not been collected yet)."""
    import concurrent.futures

    import paylater.backfill as bf

    finished = threading.Event()

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
            future = super().submit(fn, *args, **kwargs)
            # Callbacks run once the future is done: the failure is then known.
            future.add_done_callback(lambda _: finished.set())
            return future

    monkeypatch.setattr(bf, "ThreadPoolExecutor", Pool)
    ran: list[date] = []

    def run(day: date) -> str:
        ran.append(day)
        if day == D1:
            raise RuntimeError("source unreachable")
        return "ok"

    def is_complete(day: date) -> bool:
        if day == date(2026, 11, 2):
            assert finished.wait(30)  # day 1 has failed before day 2's check ends
            return True
        return False

    with pytest.raises(BackfillError, match="2026-11-01 failed"):
        backfill(D1, D5, run, concurrency=2, is_complete=is_complete)
    assert ran == [D1]


def test_a_day_that_cannot_be_checked_stops_the_backfill_like_a_failed_day() -> None:
    """The check opens the warehouse; one held by another process must not end the backfill
    with a traceback and without a word on the days it completed."""
    ran: list[date] = []
    reported: list[str] = []

    def run(day: date) -> str:
        ran.append(day)
        return "ok"

    def is_complete(day: date) -> bool:
        if day == date(2026, 11, 2):
            raise OSError("Could not set lock on file\n'warehouse.duckdb'")
        return False

    with pytest.raises(BackfillError, match=r"2026-11-02 failed \(checking it: OSError: .*lock"):
        backfill(D1, D5, run, is_complete=is_complete, report=lambda o: reported.append(o.status))
    assert ran == [D1]
    assert reported == ["completed", "failed"]


def test_a_deployment_that_was_never_deployed_is_named(prefect_harness: None) -> None:
    """`--deployment` before `prefect deploy`: Prefect says only `ObjectNotFound: None`."""
    from paylater.backfill import run_through_deployment

    with pytest.raises(BackfillError) as failure:
        run_through_deployment(D1, timeout_s=60)
    message = str(failure.value)
    assert "deployment daily-pipeline/daily-pipeline not found" in message
    assert "prefect --no-prompt deploy --all" in message and "--in-process" in message


def _complete_day_but_its_publish(home: Path, as_of: date) -> None:
    """A day whose sync ledger and both datasets are complete, as a pipeline that died at the
    online publish leaves it (the warehouse and datasets of the embedded defaults under home)."""
    from datetime import UTC, datetime

    import pyarrow as pa

    from paylater.timeutil import day_end_utc
    from tasks.datasets import write_dataset
    from tasks.storage import open_storage
    from tasks.sync import configured_tables
    from tasks.warehouse import open_warehouse

    names = [spec.name for spec in configured_tables()]
    n = len(names)
    ledger = pa.table(
        {
            "table_name": pa.array(names, pa.string()),
            "as_of": pa.array([as_of] * n, pa.date32()),
            "mode": pa.array(["incremental"] * n, pa.string()),
            "watermark_from": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
            "watermark_to": pa.array([day_end_utc(as_of)] * n, pa.timestamp("us", tz="UTC")),
            "rows_extracted": pa.array([1] * n, pa.int64()),
            "rows_loaded": pa.array([1] * n, pa.int64()),
            "warehouse_rows": pa.array([1] * n, pa.int64()),
            "duration_seconds": pa.array([0.1] * n, pa.float64()),
            "status": pa.array(["succeeded"] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
            "finished_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        }
    )
    warehouse = open_warehouse(f"duckdb:///{home / 'warehouse.duckdb'}")
    warehouse.replace_table("sync_ledger", ledger)
    warehouse.close()
    rows = pa.table({"user_id": [1], "as_of": [as_of], "f": [1.0], "charge_id": [1]})
    for kind in ("training", "scoring"):
        write_dataset(
            open_storage(), kind, as_of, rows, features=["f"], sql_hash="h", source_watermark=None
        )


def test_a_day_whose_online_publish_failed_is_not_complete(paylater_home: Path) -> None:
    # A pipeline that died at the publish (the source database restarting) left the ledger and
    # datasets complete: the backfill run again skipped the day as complete, and the service
    # kept scoring with the previous day's features.
    import sqlite3

    import pyarrow as pa

    from paylater.backfill import day_is_complete
    from tasks.online import publish_user_features

    day = date(2026, 11, 5)
    sqlite3.connect(paylater_home / "source.db").close()  # the embedded source, empty
    _complete_day_but_its_publish(paylater_home, day)
    assert not day_is_complete(day)  # nothing ever published
    older = pa.table({"user_id": [1], "as_of": [date(2026, 11, 4)], "f": [1.0]})
    publish_user_features(older)
    assert not day_is_complete(day)  # the online table holds the day before
    publish_user_features(older.set_column(1, "as_of", pa.array([day])))
    assert day_is_complete(day)
    later = pa.table({"user_id": [1], "as_of": [date(2026, 11, 9)], "f": [1.0]})
    publish_user_features(later)
    assert day_is_complete(day)  # a backfilled day: its features are never published


def test_a_prefect_api_that_cannot_be_reached_is_named() -> None:
    # `--deployment` with the Prefect server down (or PREFECT_API_URL mistyped) stopped the
    # backfill with "ConnectError: [Errno 111] Connection refused", naming nothing.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from paylater.backfill import run_through_deployment
    from paylater.testing import listen_port

    api = f"http://ops:s3cr3t@127.0.0.1:{listen_port()}/api"  # nobody listens there
    with (
        temporary_settings({PREFECT_API_URL: api}),
        pytest.raises(
            BackfillError,
            match=r"cannot reach the Prefect API at http://ops:\*\*\*@127\.0\.0\.1:\d+/api",
        ) as raised,
    ):
        run_through_deployment(D1)
    assert "s3cr3t" not in str(raised.value)
