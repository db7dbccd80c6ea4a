"""daily_sync end to end under the Prefect test harness: a SQLite source into a DuckDB warehouse,
then a failing run that alerts a real local HTTP receiver."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

import pytest

from flows.daily_sync import daily_sync
from paylater.testing import JsonReceiver
from tasks.sync import ConfigError, check_ledger, ledger_watermark
from tasks.warehouse import open_warehouse

ROOT = Path(__file__).resolve().parents[2]


def make_source(path: Path) -> None:
    """A SQLite source with one row per table, all on business day 2026-11-20."""
    with sqlite3.connect(path) as db:
        db.executescript((ROOT / "schema/source_sqlite.sql").read_text())
        at = "2026-11-20T03:00:00.000000+00:00"
        db.execute("INSERT INTO users VALUES (1, ?, 1990, 'Tokyo', NULL, 'active', ?)", (at, at))
        db.execute(
            "INSERT INTO card_transactions VALUES (1, 1, ?, 500, 7, 'grocery', 'online', 'settled', ?)",
            (at, at),
        )
        db.execute("INSERT INTO topups VALUES (1, 1, ?, 10000, 'bank', ?)", (at, at))
        db.execute(
            "INSERT INTO deferred_charges VALUES (1, 1, ?, 3000, 300, '2026-12-27', 'outstanding', NULL, NULL, ?)",
            (at, at),
        )


@pytest.fixture
def alerts_received(monkeypatch: pytest.MonkeyPatch):
    """A loopback HTTP receiver on a free port, set as the alert webhook; yields the bodies."""
    with JsonReceiver() as receiver:
        monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", receiver.url)
        yield receiver.bodies


def test_daily_sync_flow_then_failure_alert(
    prefect_harness, paylater_home: Path, tmp_path: Path, monkeypatch, alerts_received
) -> None:
    import flows.daily_sync

    sent: list[dict] = []
    monkeypatch.setattr(flows.daily_sync, "emit_event", lambda **kw: sent.append(kw))
    make_source(paylater_home / "source.db")
    as_of = date(2026, 11, 20)
    report = daily_sync(as_of=as_of)
    assert [t.table_name for t in report.tables] == [
        "users",
        "card_transactions",
        "topups",
        "deferred_charges",
    ]
    assert all(t.status == "succeeded" and t.warehouse_rows == 1 for t in report.tables)
    warehouse = open_warehouse(f"duckdb:///{paylater_home / 'warehouse.duckdb'}")
    check_ledger(warehouse, as_of)
    assert ledger_watermark(warehouse, as_of).isoformat() == "2026-11-20T15:00:00+00:00"
    warehouse.close()
    assert alerts_received == []
    # Run on its own (a deployment), the sync announces itself: that starts feature-build.
    assert [(e["event"], e["payload"]["as_of"]) for e in sent] == [
        ("paylater.sync.completed", "2026-11-20")
    ]

    bad = tmp_path / "tables.yaml"
    bad.write_text("tables:\n  - {name: loans, primary_key: loan_id}\n")
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(bad))
    with pytest.raises(ConfigError, match="table loans does not exist in the source database"):
        # A string as_of, as a trigger sends it: Prefect validates it into a date, which
        # Flow.__call__'s typing (the function's own signature) does not model.
        daily_sync(as_of="2026-11-21")  # type: ignore[call-overload]
    assert len(sent) == 1  # a failed sync announces nothing
    (alert,) = alerts_received
    assert alert["subject"].endswith("of 'daily-sync' failed")
    assert "table loans does not exist" in alert["text"]
    assert "as_of=2026-11-21" in alert["body"]


def test_completed_sync_announces_its_as_of(monkeypatch: pytest.MonkeyPatch) -> None:
    """The feature-build deployment is triggered by this event, with the as_of from its payload."""
    import flows.daily_sync as module
    from tasks.sync import SyncReport

    sent: list[dict] = []
    monkeypatch.setattr(module, "emit_event", lambda **kw: sent.append(kw))
    module.announce_completed.fn(SyncReport(as_of=date(2026, 11, 26), tables=[]))
    (event,) = sent
    assert event["event"] == "paylater.sync.completed"
    assert event["resource"]["prefect.resource.id"] == "paylater.sync.2026-11-26"
    assert event["payload"]["as_of"] == "2026-11-26"


def test_a_day_that_has_not_ended_is_refused_once_before_any_table(
    prefect_harness, paylater_home: Path, monkeypatch, alerts_received
) -> None:
    """`paylater demo-data advance` can simulate today; syncing it is refused in one sentence,
    not that sentence repeated for every table, and no table task runs."""
    import flows.daily_sync
    from paylater.timeutil import resolve_as_of
    from tasks.sync import SyncError

    make_source(paylater_home / "source.db")
    ran: list[object] = []

    def validate_sync_config() -> list[object]:
        ran.append(1)
        return []

    monkeypatch.setattr(flows.daily_sync, "validate_sync_config", validate_sync_config)
    today = date.fromordinal(resolve_as_of(None).toordinal() + 1)
    with pytest.raises(SyncError) as refused:
        daily_sync(as_of=today)
    assert str(refused.value) == (
        f"as_of {today} has not ended yet in the business time zone; sync it tomorrow"
    )
    assert ran == []
    (alert,) = alerts_received
    assert alert["text"].count("has not ended yet") == 1, alert["text"]


def test_a_propagated_delete_is_in_the_flow_report(
    prefect_harness, paylater_home: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """A table with `deletes: propagate` (here on the SQLite source) reports what it deleted."""
    import flows.daily_sync

    monkeypatch.setattr(flows.daily_sync, "emit_event", lambda **kw: None)
    make_source(paylater_home / "source.db")
    config = (ROOT / "tasks/sync_tables.yaml").read_text()
    config = config.replace(
        "  - name: topups\n    primary_key: [topup_id]\n",
        "  - name: topups\n    primary_key: [topup_id]\n    deletes: propagate\n",
    )
    assert "deletes: propagate" in config
    (tmp_path / "tables.yaml").write_text(config)
    monkeypatch.setenv("PAYLATER_SYNC_TABLES", str(tmp_path / "tables.yaml"))
    daily_sync(as_of=date(2026, 11, 20))
    with sqlite3.connect(paylater_home / "source.db") as db:
        db.execute("DELETE FROM topups WHERE topup_id = 1")
    caplog.clear()
    report = daily_sync(as_of=date(2026, 11, 21))
    deleted = {t.table_name: t.rows_deleted for t in report.tables}
    assert deleted == {
        "users": None,
        "card_transactions": None,
        "topups": 1,
        "deferred_charges": None,
    }
    assert next(t for t in report.tables if t.table_name == "topups").warehouse_rows == 0
    assert "topups: 0 rows extracted, 1 deleted (gone from the source), 0 in the warehouse" in (
        caplog.text
    )


def test_a_reread_is_asked_of_the_flow_by_table_name(
    prefect_harness, paylater_home: Path, monkeypatch, caplog
) -> None:
    """`reread` reads the named tables whole (the others as usual), which the report and the
    log say of them; an unknown name is refused before any table is synced."""
    import flows.daily_sync

    monkeypatch.setattr(flows.daily_sync, "emit_event", lambda **kw: None)
    make_source(paylater_home / "source.db")
    daily_sync(as_of=date(2026, 11, 20))
    with pytest.raises(
        ConfigError, match="reread names table\\(s\\) the sync does not copy: loans"
    ):
        daily_sync(as_of=date(2026, 11, 21), reread=["loans"])
    caplog.clear()
    report = daily_sync(as_of=date(2026, 11, 21), reread=["topups"])
    starts = {t.table_name: t.watermark_from for t in report.tables}
    assert starts["topups"] is None and starts["users"] is not None
    assert [t.table_name for t in report.tables if t.reread] == ["topups"]
    assert (
        "topups (re-read whole): 1 rows extracted, 0 deleted (gone from the source),"
        " 1 in the warehouse"
    ) in caplog.text
    assert "users: 0 rows extracted" in caplog.text and "users (re-read" not in caplog.text
    assert {t.table_name: t.warehouse_rows for t in report.tables}["topups"] == 1


def test_a_setting_that_fails_validation_still_alerts_naming_it(
    prefect_harness, paylater_home: Path, monkeypatch, alerts_received
) -> None:
    """One invalid PAYLATER_ setting fails every flow; its alert read the same settings and
    raised in the hook, so the failure most likely to stop everything reached no one."""
    from pydantic import ValidationError

    monkeypatch.setenv("PAYLATER_TIMEZONE", "Mars/Olympus_Mons")
    with pytest.raises(ValidationError):
        daily_sync(as_of=date(2026, 11, 20))
    (alert,) = alerts_received
    assert alert["subject"].endswith("of 'daily-sync' failed")
    assert "Mars/Olympus_Mons" in alert["body"] or "timezone" in alert["body"], alert["body"]


def test_a_sync_waits_for_one_already_running_and_says_whom_it_timed_out_on(
    prefect_harness, paylater_home: Path, monkeypatch, alerts_received
) -> None:
    """The flow holds the warehouse's sync lock for its run: started while another sync holds
    it, it waits (here: not at all) and fails naming that sync, having written nothing."""
    from tasks.sync_lock import SyncLockTimeout, sync_lock

    make_source(paylater_home / "source.db")
    monkeypatch.setenv("PAYLATER_SYNC_LOCK_WAIT_SECONDS", "0")
    warehouse_url = f"duckdb:///{paylater_home / 'warehouse.duckdb'}"
    source_url = f"sqlite:///{paylater_home / 'source.db'}"
    held_by = "held by 'paylater-sync daily-sync/earlier-run"
    with (
        sync_lock(source_url, warehouse_url, 0, "daily-sync/earlier-run", print),
        pytest.raises(SyncLockTimeout, match=held_by),
    ):
        daily_sync(as_of=date(2026, 11, 20))
    (alert,) = alerts_received
    assert "PAYLATER_SYNC_LOCK_WAIT_SECONDS=0" in alert["text"]
    warehouse = open_warehouse(warehouse_url)
    try:
        assert not warehouse.table_exists("sync_ledger")
    finally:
        warehouse.close()
    # Released, the same sync runs.
    report = daily_sync(as_of=date(2026, 11, 20), announce=False)
    assert report.succeeded
