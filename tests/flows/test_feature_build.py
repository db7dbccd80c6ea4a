"""feature_build end to end under the Prefect test harness: warehouse -> datasets -> online table."""

from __future__ import annotations

import sqlite3
from datetime import date, timedelta
from pathlib import Path

import pytest

from flows.feature_build import feature_build
from tasks.datasets import DatasetError, load_scoring_dataset, load_training_dataset
from tasks.features import FeatureSqlError
from tasks.warehouse import open_warehouse
from tasks.warehouse.duckdb import DuckDBWarehouse

ROOT = Path(__file__).resolve().parents[2]


def make_warehouse(path: Path, with_events: bool = True) -> None:
    """Source-shaped tables with a matured charge, an unmatured one and two active users."""
    warehouse = open_warehouse(f"duckdb:///{path}")
    assert isinstance(warehouse, DuckDBWarehouse)  # the source DDL and rows go in as DuckDB SQL
    conn = warehouse.conn
    conn.execute((ROOT / "schema" / "source_postgres.sql").read_text())
    if with_events:
        warehouse.execute((ROOT / "schema" / "warehouse_app_events.sql").read_text())
    conn.execute(
        """
        INSERT INTO users VALUES
          (1, '2026-01-05 01:00:00+00', 1990, 'Tokyo', NULL, 'active', '2026-01-05 01:00:00+00'),
          (2, '2026-02-05 01:00:00+00', 1991, 'Chiba', NULL, 'active', '2026-02-05 01:00:00+00');
        INSERT INTO card_transactions VALUES
          (1, 1, '2026-03-01 13:00:00+00', 1200, 7, 'grocery', 'in_store', 'settled', '2026-03-01 13:00:00+00');
        INSERT INTO deferred_charges VALUES
          (10, 1, '2026-03-25 03:00:00+00', 10000, 400, '2026-04-27', 'repaid', '2026-04-20 00:00:00+00', 0, '2026-04-20 00:00:00+00'),
          (12, 2, '2026-07-01 03:00:00+00', 3000, 200, '2026-08-27', 'outstanding', NULL, NULL, '2026-07-01 03:00:00+00');
        """
    )
    warehouse.close()


def test_feature_build_writes_datasets_and_online_table(
    prefect_harness: None, paylater_home: Path
) -> None:
    make_warehouse(paylater_home / "warehouse.duckdb")
    # A string as_of, as the UI or a trigger sends it: Prefect validates the parameter into a date,
    # which Flow.__call__'s typing (the function's own signature) does not model.
    result = feature_build(as_of="2026-07-15")  # type: ignore[call-overload]
    assert result.as_of == date(2026, 7, 15)
    assert (result.training_rows, result.scoring_rows, result.online_rows) == (1, 2, 2)
    training, manifest = load_training_dataset()
    assert training["charge_id"].to_pylist() == [10] and manifest.sha256 == result.training_sha256
    scoring, _ = load_scoring_dataset(date(2026, 7, 15))
    with sqlite3.connect(paylater_home / "source.db") as db:
        online = db.execute(
            "SELECT user_id, as_of, card_count_90d FROM user_features_latest"
        ).fetchall()
    assert online == [(1, "2026-07-15", 0), (2, "2026-07-15", 0)]
    assert scoring.num_rows == 2
    # A backfill of an earlier day writes its datasets but leaves the newer online features.
    earlier = feature_build(as_of="2026-07-10")  # type: ignore[call-overload]  # as above
    assert (earlier.scoring_rows, earlier.online_rows) == (2, 0)
    assert load_scoring_dataset(date(2026, 7, 10))[1].sha256 == earlier.scoring_sha256
    with sqlite3.connect(paylater_home / "source.db") as db:
        assert db.execute("SELECT DISTINCT as_of FROM user_features_latest").fetchall() == [
            ("2026-07-15",)
        ]


def test_feature_build_names_missing_tables(prefect_harness: None, paylater_home: Path) -> None:
    make_warehouse(paylater_home / "warehouse.duckdb", with_events=False)
    with pytest.raises(FeatureSqlError, match=r"lacks source table\(s\) \['app_events'\]"):
        feature_build(as_of=date(2026, 7, 15))


def test_a_day_that_has_not_ended_is_refused_and_the_online_table_kept(
    prefect_harness: None, paylater_home: Path
) -> None:
    """A build for today or a later day (a typo, a clock off) would label charges by repayments
    still to come and put a future as_of online, after which every real day's build is "older"
    and left unpublished: the service would score with frozen features."""
    from paylater.timeutil import today

    make_warehouse(paylater_home / "warehouse.duckdb")
    feature_build(as_of=date(2026, 7, 15))
    for day in (today(), today() + timedelta(days=366), date.max):
        with pytest.raises(DatasetError, match=f"as_of {day} has not ended yet"):
            feature_build(as_of=day)
        assert not (paylater_home / "datasets" / "training" / f"as_of={day}").exists()
        assert not (paylater_home / "datasets" / "scoring" / f"as_of={day}").exists()
    with sqlite3.connect(paylater_home / "source.db") as db:
        assert db.execute("SELECT DISTINCT as_of FROM user_features_latest").fetchall() == [
            ("2026-07-15",)
        ]


def test_a_backfilled_day_before_the_first_signup_completes_without_publishing(
    prefect_harness: None, paylater_home: Path
) -> None:
    """A backfill over the first days (no active user yet: an empty scoring set) failed at the
    publish, stopping the backfill, though an older day never replaces the online table."""
    make_warehouse(paylater_home / "warehouse.duckdb")
    feature_build(as_of=date(2026, 7, 15))
    before_launch = feature_build(as_of=date(2026, 1, 1))
    assert (before_launch.scoring_rows, before_launch.online_rows) == (0, 0)
    with sqlite3.connect(paylater_home / "source.db") as db:
        assert db.execute(
            "SELECT as_of, count(*) FROM user_features_latest GROUP BY 1"
        ).fetchall() == [("2026-07-15", 2)]


def test_a_training_set_that_fails_still_leaves_the_service_todays_features(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training set (read once a month by the retrain) was built first: when it failed
    (its label SQL, a storage hiccup past its retry), the scoring set was never built nor
    published, and the service scored with the day before's features."""
    import flows.feature_build

    def broken_labels(as_of: date) -> object:
        raise FeatureSqlError("label.sql: the warehouse rejected it")

    make_warehouse(paylater_home / "warehouse.duckdb")
    monkeypatch.setattr(flows.feature_build, "build_training_dataset", broken_labels)
    with pytest.raises(FeatureSqlError, match=r"label\.sql"):
        feature_build(as_of=date(2026, 7, 15))
    assert load_scoring_dataset(date(2026, 7, 15))[0].num_rows == 2
    with sqlite3.connect(paylater_home / "source.db") as db:
        assert db.execute("SELECT DISTINCT as_of FROM user_features_latest").fetchall() == [
            ("2026-07-15",)
        ]
    with pytest.raises(DatasetError, match="no complete training dataset"):
        load_training_dataset(date(2026, 7, 15))


def test_a_publish_that_fails_still_leaves_the_days_training_set(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.online import PublishError

    make_warehouse(paylater_home / "warehouse.duckdb")
    monkeypatch.setenv("PAYLATER_SOURCE_URL", "mysql://features@db/ops")
    with pytest.raises(PublishError, match="cannot publish online features"):
        feature_build(as_of=date(2026, 7, 15))
    assert load_training_dataset(date(2026, 7, 15))[0]["charge_id"].to_pylist() == [10]


def test_a_missing_storage_block_fails_the_build_once_without_retrying(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block name that names no block is configuration: no retry (30 s later) can mend it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.storage import StorageError

    make_warehouse(paylater_home / "warehouse.duckdb")
    monkeypatch.setenv("PAYLATER_DATASET_URL", "s3://risk-data/datasets")
    monkeypatch.setenv("PAYLATER_DATASET_S3_BLOCK", "no-such-datasets-block")
    state = feature_build(as_of=date(2026, 7, 15), return_state=True)
    with pytest.raises(StorageError, match="PAYLATER_DATASET_S3_BLOCK 'no-such-datasets-block'"):
        state.result()
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    scoring = [r for r in runs if r.name.startswith("scoring_dataset")]
    assert [r.run_count for r in scoring] == [1]


def test_a_publish_and_a_training_set_that_both_fail_are_both_in_the_alert(
    prefect_harness: None, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both steps are tried; the run failed with the publish's error alone, so its alert hid
    that the day's training set failed too, which showed only after fixing the first."""
    import flows.feature_build
    from paylater.testing import JsonReceiver
    from tasks.online import PublishError

    def broken_labels(as_of: date) -> object:
        raise FeatureSqlError("label.sql: the warehouse rejected it")

    with JsonReceiver() as receiver:
        monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", receiver.url)
        make_warehouse(paylater_home / "warehouse.duckdb")
        monkeypatch.setenv("PAYLATER_SOURCE_URL", "mysql://features@db/ops")
        monkeypatch.setattr(flows.feature_build, "build_training_dataset", broken_labels)
        with pytest.raises(PublishError, match="cannot publish online features"):
            feature_build(as_of=date(2026, 7, 15))
    (alert,) = receiver.bodies
    assert alert["body"].startswith("PublishError: ")
    assert "training_dataset also failed: FeatureSqlError: label.sql" in alert["body"]
