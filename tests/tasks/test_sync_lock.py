"""The warehouse sync lock on the real PostgreSQL (advisory lock) and on files (SQLite source):
two syncs of one warehouse run one after the other, a wait that times out names the holder, a
killed holder releases it, and different warehouses never wait for each other."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tasks.sync import check_ledger
from tasks.sync_lock import (
    SyncLockLost,
    SyncLockTimeout,
    lock_key,
    sync_lock,
    warehouse_identity,
)
from tasks.warehouse import open_warehouse
from tests.tasks.test_sync import D1, SourceDB, seed, sync_all

HOLDER = "daily-sync/holding-run as_of 2026-11-20"


def take(
    source: str, warehouse: str, wait: float, label: str, on_wait: Callable[[str], None]
) -> None:
    """Take the sync lock and let it go again at once."""
    with sync_lock(source, warehouse, wait, label, on_wait):
        pass


def never_waits(message: str) -> None:
    """An on_wait for a sync that must not wait."""
    raise AssertionError(f"waited: {message}")


def test_two_syncs_of_one_warehouse_started_together_run_one_after_the_other(
    pg_url: str, tmp_path: Path
) -> None:
    db = SourceDB("postgres", pg_url)
    seed(db)
    url = f"duckdb:///{tmp_path / 'wh.duckdb'}"
    second_waits = threading.Event()
    said: dict[str, list[str]] = {"first": [], "second": []}
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run(name: str, first_holds: threading.Event) -> None:
        def on_wait(message: str) -> None:
            said[name].append(message)
            second_waits.set()

        try:
            with sync_lock(pg_url, url, 30, f"daily-sync/{name}", on_wait):
                first_holds.set()
                if name == "first":  # sync only once the second is known to be waiting
                    assert second_waits.wait(10), "the second sync never waited"
                warehouse = open_warehouse(url)
                try:
                    results[name] = [r.status for r in sync_all(db, warehouse, D1)]
                finally:
                    warehouse.close()
        except BaseException as exc:
            errors.append(exc)
            first_holds.set()

    holds = threading.Event()
    first = threading.Thread(target=run, args=("first", holds))
    first.start()
    assert holds.wait(10)
    second = threading.Thread(target=run, args=("second", threading.Event()))
    second.start()
    first.join(30)
    second.join(30)
    assert errors == []
    assert results == {"first": ["succeeded"] * 4, "second": ["succeeded"] * 4}
    assert said["first"] == []
    waiting, acquired = said["second"]
    assert "holds its sync lock: 'paylater-sync daily-sync/first pid" in waiting, waiting
    assert "from 127.0.0.1, since " in waiting and "PAYLATER_SYNC_LOCK_WAIT_SECONDS" in waiting
    assert acquired.startswith("sync lock of warehouse duckdb:") and "acquired after" in acquired
    warehouse = open_warehouse(url)
    try:
        check_ledger(warehouse, D1)
    finally:
        warehouse.close()


def test_a_sync_whose_wait_times_out_names_the_holder_and_the_setting(
    pg_url: str, tmp_path: Path
) -> None:
    url = f"duckdb:///{tmp_path / 'wh.duckdb'}"
    said: list[str] = []
    with sync_lock(pg_url, url, 30, HOLDER, never_waits):
        with pytest.raises(SyncLockTimeout) as at_once:
            take(pg_url, url, 0, "daily-sync/other", never_waits)
        with pytest.raises(SyncLockTimeout) as later:
            take(pg_url, url, 0.2, "daily-sync/other", said.append)
    message = str(at_once.value)
    assert f"held by 'paylater-sync {HOLDER} pid " in message, message
    assert "from 127.0.0.1, since " in message and "backend pid " in message
    assert "(PAYLATER_SYNC_LOCK_WAIT_SECONDS=0)" in message
    assert "pg_terminate_backend(" in message
    assert "was still held after 0.2 s by 'paylater-sync daily-sync/holding-run" in str(later.value)
    assert "(PAYLATER_SYNC_LOCK_WAIT_SECONDS=0.2)" in str(later.value)
    (waiting,) = said
    assert "waiting for it to finish (at most 0.2 s" in waiting
    # Released with the block: the next sync gets it at once.
    take(pg_url, url, 0, "daily-sync/next", never_waits)


def test_a_holder_whose_connection_is_killed_releases_the_lock_and_learns_it_lost_it(
    pg_url: str, tmp_path: Path
) -> None:
    url = f"duckdb:///{tmp_path / 'wh.duckdb'}"
    with sync_lock(pg_url, url, 0, "daily-sync/killed-run", never_waits) as lock:
        lock.confirm()  # held: nothing to say
        with psycopg.connect(pg_url, autocommit=True) as admin:
            (pid,) = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
                ["paylater-sync daily-sync/killed-run %"],
            ).fetchone() or (None,)
            assert pid is not None
            assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        said: list[str] = []
        # The killed session's lock goes with its backend, which exits right after the signal.
        take(pg_url, url, 10, "daily-sync/after", said.append)
        # The killed run, still going, stops before its next table instead of writing beside
        # whichever sync took the lock since.
        with pytest.raises(SyncLockLost, match="was lost: its source session ended"):
            lock.confirm()
    # Leaving the killed holder's block raises nothing: the sync's own outcome is what counts.


def test_different_warehouses_never_wait_for_each_other_and_one_is_one_however_spelled(
    pg_url: str, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    one = f"duckdb:///{tmp_path / 'one.duckdb'}"
    spelled_otherwise = f"duckdb:///{tmp_path / 'sub' / '..' / 'one.duckdb'}"
    other = f"duckdb:///{tmp_path / 'other.duckdb'}"
    assert warehouse_identity(one) == warehouse_identity(spelled_otherwise)
    assert warehouse_identity("bigquery://proj/ds?location=asia") == "bigquery:proj.ds"
    assert lock_key("bigquery:proj.ds") != lock_key("bigquery:proj.ds2")
    with sync_lock(pg_url, one, 0, "daily-sync/one", never_waits):
        take(pg_url, other, 0, "daily-sync/other", never_waits)
        with pytest.raises(SyncLockTimeout, match="daily-sync/one"):
            take(pg_url, spelled_otherwise, 0, "daily-sync/again", never_waits)


def test_a_sqlite_sourced_sync_locks_a_file_beside_the_warehouse(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    url = f"duckdb:///{tmp_path / 'wh.duckdb'}"
    said: list[str] = []
    with sync_lock(source, url, 0, HOLDER, never_waits):
        assert (tmp_path / "wh.duckdb.sync-lock").exists()
        held_by = f"after 0.3 s by 'paylater-sync {HOLDER} pid .*since "
        with pytest.raises(SyncLockTimeout, match=held_by):
            take(source, url, 0.3, "daily-sync/other", said.append)
    assert "waiting for it to finish" in said[0]
    take(source, url, 0, "daily-sync/next", never_waits)


def test_an_unreachable_source_fails_the_lock_saying_so(
    silent_postgres: str, tmp_path: Path
) -> None:
    from tasks.sync_config import SourceUnavailable

    with pytest.raises(SourceUnavailable, match="unreachable for the sync lock") as failed:
        take(silent_postgres, f"duckdb:///{tmp_path / 'wh.duckdb'}", 0, "x", never_waits)
    assert "secret" not in str(failed.value)


HOLDING_PROCESS = """
import sys
import duckdb
from tasks.sync_lock import sync_lock

source, warehouse_url, path = sys.argv[1:4]
with sync_lock(source, warehouse_url, 0, "daily-sync/other-process", print):
    warehouse = duckdb.connect(path)  # the file's lock, as a sync in another process holds it
    print("holding", flush=True)
    sys.stdin.readline()
    warehouse.close()
"""


def test_a_sync_waits_for_one_in_another_process_instead_of_failing_on_the_file_lock(
    pg_url: str, tmp_path: Path
) -> None:
    # Two processes (the scheduled sync and a manual pipeline): the later one failed at once on
    # DuckDB's lock of the file the earlier one had open.
    import subprocess
    import sys

    db = SourceDB("postgres", pg_url)
    seed(db)
    url = f"duckdb:///{tmp_path / 'wh.duckdb'}"
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDING_PROCESS, pg_url, url, str(tmp_path / "wh.duckdb")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "holding"
        said: list[str] = []

        def let_go(message: str) -> None:
            said.append(message)
            if len(said) == 1:  # waiting: the other sync finishes now
                assert other.stdin is not None
                other.stdin.write("done\n")
                other.stdin.flush()

        with sync_lock(pg_url, url, 30, "daily-sync/this-process", let_go):
            warehouse = open_warehouse(url)
            try:
                assert [r.status for r in sync_all(db, warehouse, D1)] == ["succeeded"] * 4
            finally:
                warehouse.close()
    finally:
        if other.poll() is None:
            other.kill()
        other.wait(10)
    assert "holds its sync lock: 'paylater-sync daily-sync/other-process pid " in said[0], said
    assert "acquired after" in said[1]
