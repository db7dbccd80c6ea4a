"""daily_pipeline: sync, then features only from a complete sync; otherwise it stops and says why."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from flows.daily_pipeline import SyncNotComplete, daily_pipeline, require_complete_sync
from paylater.testing import JsonReceiver
from tasks.datasets import load_scoring_dataset
from tasks.features import FeatureSqlError
from tasks.sync import LEDGER
from tasks.warehouse import open_warehouse

ROOT = Path(__file__).resolve().parents[2]
AS_OF = date(2026, 7, 15)
AT = "2026-07-10T03:00:00.000000+00:00"


def make_source(path: Path, bad_topup: bool = False) -> None:
    """A SQLite source with one user, a card transaction, a top-up and a matured charge."""
    with sqlite3.connect(path) as db:
        db.executescript((ROOT / "schema/source_sqlite.sql").read_text())
        db.execute(
            "INSERT INTO users VALUES (1, '2026-01-05T00:00:00+00:00', 1990, 'Tokyo', NULL, 'active', ?)",
            (AT,),
        )
        db.execute(
            "INSERT INTO card_transactions VALUES (1, 1, ?, 500, 7, 'grocery', 'online', 'settled', ?)",
            (AT, AT),
        )
        db.execute(
            "INSERT INTO topups VALUES (1, 1, ?, 10000, 'bank', ?)",
            ("not a time" if bad_topup else AT, AT),
        )
        db.execute(
            "INSERT INTO deferred_charges VALUES (1, 1, '2026-03-03T03:00:00+00:00', 3000, 200, "
            "'2026-04-27', 'repaid', '2026-04-25T03:00:00+00:00', 0, ?)",
            (AT,),
        )


def make_events_table(home: Path) -> None:
    """app_events lands in the warehouse directly (not synced): create it empty."""
    warehouse = open_warehouse(f"duckdb:///{home / 'warehouse.duckdb'}")
    warehouse.execute((ROOT / "schema" / "warehouse_app_events.sql").read_text())
    warehouse.close()


def test_pipeline_syncs_then_builds(prefect_harness: None, paylater_home: Path) -> None:
    make_source(paylater_home / "source.db")
    make_events_table(paylater_home)
    result = daily_pipeline(as_of=AS_OF)
    assert (result.training_rows, result.scoring_rows, result.online_rows) == (1, 1, 1)
    _, manifest = load_scoring_dataset(AS_OF)
    assert manifest.source_watermark == "2026-07-15T15:00:00+00:00"  # end of as_of in Tokyo


def test_pipeline_does_not_also_announce_its_sync(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline builds the features itself: its sync must not emit paylater.sync.completed,
    which the feature-build deployment's trigger answers with a second build of the same day
    (on a DuckDB warehouse, a second process contending for the file while this one builds)."""
    import flows.daily_sync

    sent: list[dict] = []
    monkeypatch.setattr(flows.daily_sync, "emit_event", lambda **kw: sent.append(kw))
    make_source(paylater_home / "source.db")
    make_events_table(paylater_home)
    daily_pipeline(as_of=AS_OF)
    assert [e["event"] for e in sent] == []


def test_pipeline_stops_when_the_sync_fails(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.daily_sync

    # The sync retries a failed table after 10 s and 60 s; a deterministic failure need not wait.
    task = flows.daily_sync.sync_table_task
    monkeypatch.setattr(flows.daily_sync, "sync_table_task", task.with_options(retries=0))
    make_source(paylater_home / "source.db", bad_topup=True)
    make_events_table(paylater_home)
    with pytest.raises(SyncNotComplete, match="not started: daily_sync failed") as failure:
        daily_pipeline(as_of=AS_OF)
    # Each thing once: the sync's error (which names topups and why), not that error again as
    # the ledger's record of the same table.
    message = str(failure.value)
    cause = message.split("SyncError: ", 1)[1]
    reason = cause.split("sync of topups: ", 1)[1]
    assert message.count(reason) == 1, message
    assert message.count("topups") == 1, message
    assert not (paylater_home / "datasets").exists()


def test_a_zone_the_feature_sql_cannot_use_is_refused_before_the_sync(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feature SQL takes local days with a fixed UTC offset: with a daylight-saving zone the
    pipeline says so at once, instead of syncing first and failing in the feature build."""
    from tasks.features import FeatureSqlError

    monkeypatch.setenv("PAYLATER_TIMEZONE", "Europe/Berlin")
    make_source(paylater_home / "source.db")
    make_events_table(paylater_home)
    with pytest.raises(FeatureSqlError, match="Europe/Berlin has daylight saving"):
        daily_pipeline(as_of=AS_OF)
    warehouse = open_warehouse(f"duckdb:///{paylater_home / 'warehouse.duckdb'}")
    try:
        assert not warehouse.table_exists(LEDGER)
    finally:
        warehouse.close()


def test_incomplete_ledger_blocks_the_feature_build(
    prefect_harness: None, paylater_home: Path
) -> None:
    make_source(paylater_home / "source.db")
    make_events_table(paylater_home)
    from flows.daily_sync import daily_sync

    daily_sync(as_of=AS_OF)
    warehouse = open_warehouse(f"duckdb:///{paylater_home / 'warehouse.duckdb'}")
    warehouse.execute(f"DELETE FROM {LEDGER} WHERE table_name = 'deferred_charges'")
    warehouse.close()
    with pytest.raises(SyncNotComplete, match=r"not started.*deferred_charges \(not synced\)"):
        require_complete_sync.fn(AS_OF)


def test_a_sync_that_ends_cancelled_stops_the_chain_even_with_a_complete_ledger(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun of a synced day whose sync is cancelled (by an operator, or its infrastructure)
    has not failed, and the ledger of the earlier run still reads complete: the chain built
    features from a warehouse the cancelled sync may have left half way."""
    from prefect import flow
    from prefect.states import Cancelled

    import flows.daily_pipeline
    from flows.daily_sync import daily_sync

    make_source(paylater_home / "source.db")
    make_events_table(paylater_home)
    daily_sync(as_of=AS_OF)  # the earlier, complete run of the day

    @flow(name="daily-sync")
    def cancelled_sync(as_of: date, announce: bool = True) -> object:
        return Cancelled(message="cancelled by an operator")

    monkeypatch.setattr(flows.daily_pipeline, "daily_sync", cancelled_sync)
    with pytest.raises(
        SyncNotComplete,
        match=r"daily_sync ended Cancelled \(flow run [0-9a-f-]{36}\): cancelled by an operator",
    ):
        daily_pipeline(as_of=AS_OF)
    assert not (paylater_home / "datasets").exists()


def test_a_day_not_ended_is_refused_before_the_sync_naming_the_latest_day(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A future as_of started a sync flow run that failed (alerting once for it), then refused
    # the build with every table listed as not synced: the cause was buried in the list.
    from datetime import timedelta

    import flows.daily_pipeline
    from paylater.timeutil import default_as_of

    def no_sync(*args: object, **kwargs: object) -> object:
        raise AssertionError("the sync must not start")

    monkeypatch.setattr(flows.daily_pipeline, "daily_sync", no_sync)
    latest = default_as_of()
    with pytest.raises(
        ValueError,
        match=rf"as_of {latest + timedelta(days=3)} has not ended yet in Asia/Tokyo; "
        rf"the latest day the pipeline can run is {latest}",
    ):
        daily_pipeline(as_of=latest + timedelta(days=3))


def test_a_ledger_that_cannot_be_read_still_names_the_syncs_failure(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the warehouse unreadable after a failed sync, the check raised the warehouse's error
    # alone: the sync's own failure, the first thing to fix, was lost.
    blocker = paylater_home / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", f"duckdb:///{blocker}/warehouse.duckdb")
    with pytest.raises(
        SyncNotComplete,
        match=r"not started: daily_sync failed: source unreachable; its ledger could not be read",
    ):
        require_complete_sync.fn(AS_OF, "failed: source unreachable")


@pytest.fixture
def alerts_received(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """A loopback HTTP receiver on a free port, set as the only alert channel; yields the bodies."""
    for var in ("PAYLATER_ALERT_SLACK_BLOCK", "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY"):
        monkeypatch.delenv(var, raising=False)
    with JsonReceiver() as receiver:
        monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", receiver.url)
        yield receiver.bodies


def test_a_failed_sync_in_the_pipeline_alerts_once_naming_its_cause_and_run(
    prefect_harness: None,
    paylater_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    alerts_received: list[dict],
) -> None:
    # The sync's own hook told Slack, then the pipeline's told it again: two messages (the second
    # a generic "not started") for one failure.
    import flows.daily_sync

    task = flows.daily_sync.sync_table_task
    monkeypatch.setattr(flows.daily_sync, "sync_table_task", task.with_options(retries=0))
    make_source(paylater_home / "source.db", bad_topup=True)
    make_events_table(paylater_home)
    with pytest.raises(SyncNotComplete):
        daily_pipeline(as_of=AS_OF)
    (alert,) = alerts_received
    assert alert["subject"].endswith("of 'daily-pipeline' failed")
    assert "as_of=2026-07-15" in alert["body"]
    # The root cause, not Prefect's wrapper of it, and the sync's run to look at.
    assert "daily_sync failed (flow run " in alert["body"]
    assert "SyncError: daily sync for as_of 2026-07-15 failed: sync of topups" in alert["body"]
    assert "encountered an exception" not in alert["body"]
    assert_failed_run_named(alert["body"], "daily-sync")


def assert_failed_run_named(body: str, flow_name: str) -> None:
    """The alert names, by id, a real failed run of `flow_name`."""
    import re
    from uuid import UUID

    from prefect import get_client

    found = re.search(r"flow run ([0-9a-f-]{36})", body)
    assert found, body
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(found.group(1)))
        assert client.read_flow(run.flow_id).name == flow_name
    assert run.state is not None and run.state.is_failed()


def test_a_failed_feature_build_in_the_pipeline_alerts_once_naming_its_cause_and_run(
    prefect_harness: None, paylater_home: Path, alerts_received: list[dict]
) -> None:
    make_source(paylater_home / "source.db")  # no app_events table: the feature SQL refuses
    with pytest.raises(FeatureSqlError, match="app_events"):
        daily_pipeline(as_of=AS_OF)
    (alert,) = alerts_received
    assert alert["subject"].endswith("of 'daily-pipeline' failed")
    assert "as_of=2026-07-15" in alert["body"]
    assert alert["body"].startswith("FeatureSqlError: ") and "app_events" in alert["body"]
    assert "in feature-build flow run " in alert["body"]
    assert_failed_run_named(alert["body"], "feature-build")


def test_the_ledger_adds_to_a_failed_syncs_error_only_what_it_does_not_say(
    paylater_home: Path,
) -> None:
    # A table the sync's error names with its reason is not named again with the same reason
    # from the ledger; a table the ledger lacks (never synced) is still named.
    from datetime import UTC, datetime

    from tasks.sync import TableResult, ensure_ledger, write_ledger

    warehouse = open_warehouse(f"duckdb:///{paylater_home / 'warehouse.duckdb'}")
    try:
        ensure_ledger(warehouse)
        at = datetime(2026, 7, 16, 1, tzinfo=UTC)
        for table, status, error in [
            ("card_transactions", "succeeded", None),
            ("deferred_charges", "succeeded", None),
            ("topups", "failed", "SchemaMismatch: sync of topups: a bad value"),
        ]:
            write_ledger(
                warehouse,
                TableResult(
                    table_name=table,
                    as_of=AS_OF,
                    mode="incremental",
                    watermark_from=None,
                    watermark_to=at,
                    duration_seconds=0.1,
                    status=status,  # type: ignore[arg-type]
                    error=error,
                    finished_at=at,
                ),
            )
    finally:
        warehouse.close()
    failure = "failed (flow run 1): SyncError: daily sync failed: sync of topups: a bad value"
    with pytest.raises(SyncNotComplete) as refused:
        require_complete_sync.fn(AS_OF, failure)
    message = str(refused.value)
    assert message == (
        f"feature build for {AS_OF} not started: daily_sync {failure}; sync for as_of {AS_OF}"
        " is incomplete: users (not synced)"
    )
