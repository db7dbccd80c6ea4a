"""Publishing user_features_latest to the source database: real PostgreSQL and SQLite, atomic replace."""

from __future__ import annotations

import re
import sqlite3
import threading
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest

from paylater.settings import Settings
from tasks.online import PublishError, last_published, publish_user_features


def scoring(users: list[int], as_of: date, spend: float) -> pa.Table:
    """A scoring table shaped like the real one (user_id, as_of, int and float features)."""
    n = len(users)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "as_of": pa.array([as_of] * n, pa.date32()),
            "card_count_30d": pa.array(list(range(n)), pa.int64()),
            "card_mean_30d": pa.array([spend] * (n - 1) + [None], pa.float64()),
            "topup_days_since_last": pa.array([None] + [3] * (n - 1), pa.int64()),
        }
    )


@pytest.mark.postgres
def test_publish_to_postgres_replaces_atomically(pg_url: str, paylater_home: Path) -> None:
    assert publish_user_features(scoring([1, 2, 3], date(2026, 7, 14), 10.5), pg_url) == 3
    with psycopg.connect(pg_url) as conn:
        conn.execute("BEGIN")
        # A reader holding the old table blocks the swap, then sees old or new whole, never a mix.
        old = conn.execute("SELECT user_id, as_of FROM user_features_latest ORDER BY 1").fetchall()
        publisher = threading.Thread(
            target=publish_user_features,
            args=(scoring([2, 4], date(2026, 7, 15), 99.0), pg_url),
        )
        publisher.start()
        publisher.join(timeout=1)
        assert publisher.is_alive()  # waiting for our lock: the old table is still intact
        assert old == [(1, date(2026, 7, 14)), (2, date(2026, 7, 14)), (3, date(2026, 7, 14))]
        conn.execute("COMMIT")
        publisher.join(timeout=30)
        rows = conn.execute(
            "SELECT user_id, as_of, card_count_30d, card_mean_30d, topup_days_since_last, "
            "updated_at IS NOT NULL FROM user_features_latest ORDER BY 1"
        ).fetchall()
        assert rows == [
            (2, date(2026, 7, 15), 0, 99.0, None, True),
            (4, date(2026, 7, 15), 1, None, 3, True),
        ]
        pk = conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'user_features_latest'::regclass "
            "AND i.indisprimary"
        ).fetchall()
        assert pk == [("user_id",)]
        leftovers = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'user_features_latest__%'"
        ).fetchone()
        assert leftovers == (0,)


@pytest.mark.postgres
def test_a_publish_keeps_the_privileges_granted_on_the_online_table(
    pg_url: str, paylater_home: Path
) -> None:
    # The service and the worker read the table with their own roles; the grants a DBA gave
    # them must survive the swap, or scoring fails the morning after a publish.
    reader, writer = (f"Reader {uuid.uuid4().hex[:8]}", f"writer_{uuid.uuid4().hex[:8]}")
    publish_user_features(scoring([1, 2], date(2026, 7, 14), 1.0), pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{reader}"')
        conn.execute(f'CREATE ROLE "{writer}"')
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'GRANT SELECT ON user_features_latest TO "{reader}"')
            conn.execute(
                f'GRANT SELECT, UPDATE ON user_features_latest TO "{writer}" WITH GRANT OPTION'
            )
            conn.execute("GRANT SELECT ON user_features_latest TO PUBLIC")
        publish_user_features(scoring([3], date(2026, 7, 15), 2.0), pg_url)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            grants = conn.execute(
                "SELECT grantee, privilege_type, is_grantable FROM information_schema.role_table_grants "
                "WHERE table_name = 'user_features_latest' AND grantee <> current_user ORDER BY 1, 2"
            ).fetchall()
            conn.execute(f'SET ROLE "{reader}"')
            assert conn.execute("SELECT user_id FROM user_features_latest").fetchall() == [(3,)]
        assert grants == sorted(
            [
                ("PUBLIC", "SELECT", "NO"),
                (reader, "SELECT", "NO"),
                (writer, "SELECT", "YES"),
                (writer, "UPDATE", "YES"),
            ]
        )
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for role in (reader, writer):
                conn.execute(f'DROP OWNED BY "{role}"')
                conn.execute(f'DROP ROLE "{role}"')


def online_as_of(url: str) -> list[tuple[object, ...]]:
    """(as_of, rows) of the online table."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(
                "SELECT as_of, count(*) FROM user_features_latest GROUP BY 1"
            ).fetchall()
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT as_of, count(*) FROM user_features_latest GROUP BY 1"
        ).fetchall()


def online_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, day: date
) -> tuple[str, date | str]:
    """The online database of `backend` (the PostgreSQL fixture, or a SQLite file in tmp_path) and
    `day` as online_as_of reads it back there (SQLite stores dates as text)."""
    if backend == "postgresql":
        return request.getfixturevalue("pg_url"), day
    return f"sqlite:///{tmp_path / 'source.db'}", day.isoformat()


@pytest.mark.parametrize("backend", ["postgresql", pytest.param("sqlite")])
def test_an_older_day_never_replaces_newer_online_features(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, paylater_home: Path
) -> None:
    # A backfill of last month runs the feature build for each past day; the service must keep
    # scoring with the newest features, not with the backfilled day's.
    url, newest_day = online_url(backend, request, tmp_path, date(2026, 11, 26))
    newest = (newest_day, 2)
    assert publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), url) == 2
    assert publish_user_features(scoring([1, 2, 3], date(2026, 10, 3), 9.0), url) == 0
    assert online_as_of(url) == [newest]
    # The same day again (a rebuild after a fix) and a newer day do replace it.
    assert publish_user_features(scoring([1, 2, 3], date(2026, 11, 26), 2.0), url) == 3
    assert publish_user_features(scoring([4], date(2026, 11, 27), 2.0), url) == 1
    assert len(online_as_of(url)) == 1 and online_as_of(url)[0][1] == 1


@pytest.mark.postgres
def test_a_publish_waits_for_one_in_flight_before_comparing_days(
    pg_url: str, paylater_home: Path
) -> None:
    # The nightly build (newer day) and a backfill (older day) publishing at the same time: the
    # older one must compare against the newer one's day once that commits, not the day before
    # (which is older than both).
    publish_user_features(scoring([1], date(2026, 10, 1), 1.0), pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE user_features_latest__new (x int)")
    with psycopg.connect(pg_url) as reader:
        # A lock on the staging name holds the first publish back after it has read the online
        # table's day but before it touches the online table itself.
        reader.execute("SELECT * FROM user_features_latest__new").fetchall()
        published: dict[str, int] = {}
        newer = threading.Thread(
            target=lambda: published.update(
                newer=publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), pg_url)
            )
        )
        newer.start()
        newer.join(timeout=1)
        older = threading.Thread(
            target=lambda: published.update(
                older=publish_user_features(scoring([7, 8, 9], date(2026, 10, 3), 1.0), pg_url)
            )
        )
        older.start()
        older.join(timeout=1)
        assert newer.is_alive() and older.is_alive()
        reader.commit()
        newer.join(timeout=30)
        older.join(timeout=30)
    assert published == {"newer": 2, "older": 0}
    assert online_as_of(pg_url) == [(date(2026, 11, 26), 2)]


def test_publish_to_sqlite(tmp_path: Path, paylater_home: Path) -> None:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    publish_user_features(scoring([1, 2], date(2026, 7, 14), 1.0), url)
    publish_user_features(scoring([5, 6, 7], date(2026, 7, 15), 2.5), url)
    with sqlite3.connect(tmp_path / "source.db") as conn:
        rows = conn.execute(
            "SELECT user_id, as_of, card_mean_30d FROM user_features_latest ORDER BY 1"
        ).fetchall()
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert rows == [(5, "2026-07-15", 2.5), (6, "2026-07-15", 2.5), (7, "2026-07-15", None)]
    assert tables == ["user_features_latest"]


def test_bad_input_is_one_clear_error(tmp_path: Path, paylater_home: Path) -> None:
    with pytest.raises(PublishError, match="must start with user_id, as_of"):
        publish_user_features(
            pa.table({"as_of": [date(2026, 1, 1)], "user_id": [1]}), "sqlite:///x"
        )
    with pytest.raises(PublishError, match="cannot publish"):
        publish_user_features(scoring([1, 2], date(2026, 1, 1), 1.0), "mysql://h/db")


@pytest.mark.parametrize("backend", ["postgresql", pytest.param("sqlite")])
def test_an_empty_scoring_table_never_replaces_the_online_features(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, paylater_home: Path
) -> None:
    # A scoring build over an emptied warehouse (a sync that loaded no users) has no rows:
    # publishing it would leave the service with no features for anyone.
    url, published_day = online_url(backend, request, tmp_path, date(2026, 11, 26))
    published = (published_day, 2)
    publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), url)
    empty = scoring([1], date(2026, 11, 27), 1.0).slice(0, 0)
    with pytest.raises(PublishError, match="no rows"):
        publish_user_features(empty, url)
    with pytest.raises(PublishError, match="no rows"):
        publish_user_features(empty, url, as_of=date(2026, 11, 27))
    assert online_as_of(url) == [published]


@pytest.mark.parametrize("backend", ["postgresql", pytest.param("sqlite")])
def test_an_empty_scoring_table_of_an_older_day_is_left_unpublished_not_refused(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, paylater_home: Path
) -> None:
    # A backfill from the product's first days (before anyone had signed up, or after a SQL
    # change, over the whole history) builds days whose scoring set is empty: as for any older
    # day, the online table is kept, and the backfill goes on instead of stopping there.
    url, published_day = online_url(backend, request, tmp_path, date(2026, 11, 26))
    publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), url)
    empty = scoring([1], date(2026, 11, 27), 1.0).slice(0, 0)
    assert publish_user_features(empty, url, as_of=date(2026, 1, 2)) == 0
    assert online_as_of(url) == [(published_day, 2)]


def test_an_online_table_name_postgresql_would_cut_short_is_refused(pg_url: str) -> None:
    # PostgreSQL cuts identifiers at 63 bytes without an error: a 63-byte name's staging table
    # "<name>__new" would be cut back to the name itself, and every publish would fail obscurely.
    settings = Settings(online_features_table="f" * 63)
    with pytest.raises(PublishError, match="at most 53"):
        publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), pg_url, settings)
    fits = Settings(online_features_table="f" * 53)
    assert publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), pg_url, fits) == 2


def test_an_online_table_name_that_is_no_plain_identifier_is_refused_naming_the_setting(
    tmp_path: Path, paylater_home: Path
) -> None:
    # "risk_features\n" (the variable set with its newline) passed `^...$` and became the name
    # of a table no lookup by the intended name would find.
    settings = Settings(online_features_table="risk_features\n")
    with pytest.raises(
        PublishError,
        match=re.escape(
            "online table name (PAYLATER_ONLINE_FEATURES_TABLE) 'risk_features\\n' is not a"
            " plain SQL identifier"
        ),
    ):
        publish_user_features(
            scoring([1, 2], date(2026, 11, 26), 1.0), f"sqlite:///{tmp_path / 's.db'}", settings
        )


def test_a_feature_database_that_never_answers_fails_the_publish_in_seconds(
    silent_postgres: str,
) -> None:
    import time

    started = time.monotonic()
    from tasks.online import PublishInterrupted

    with pytest.raises(PublishInterrupted, match=r"timeout.*nothing was changed"):
        publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), silent_postgres)
    assert time.monotonic() - started < 15


@pytest.mark.postgres
def test_a_feature_name_postgresql_would_cut_short_is_refused(
    pg_url: str, paylater_home: Path
) -> None:
    # PostgreSQL cuts a 64-byte column name to 63 without an error: the online table would hold
    # a column the model does not know (its jobs held as "does not fit the model"), or two
    # features cut to one name would fail the publish as a column "specified more than once".
    publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), pg_url)
    long_name = "card_share_" + "x" * 53  # 64 bytes
    too_long = scoring([1, 2], date(2026, 11, 27), 1.0).append_column(
        long_name, pa.array([1.0, 2.0], pa.float64())
    )
    with pytest.raises(PublishError, match=f"{long_name}.*\\[64\\] bytes.*at most 63"):
        publish_user_features(too_long, pg_url)
    assert online_as_of(pg_url) == [(date(2026, 11, 26), 2)]


@pytest.mark.parametrize("backend", ["postgresql", pytest.param("sqlite")])
def test_last_published_tells_the_day_and_time_of_the_last_publish(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, paylater_home: Path
) -> None:
    # The monitor's feature_build_age reads it: what the service scores with, not what was built.
    url, _ = online_url(backend, request, tmp_path, date(2026, 11, 26))
    if backend == "sqlite":
        with pytest.raises(PublishError, match="does not exist"):
            last_published(url)
        assert not (tmp_path / "source.db").exists()
        sqlite3.connect(tmp_path / "source.db").close()
    assert last_published(url) is None
    before = datetime.now(UTC)
    publish_user_features(scoring([1, 2], date(2026, 11, 26), 1.0), url)
    after = datetime.now(UTC)
    first = last_published(url)
    assert first is not None and first.as_of == date(2026, 11, 26)
    assert before - timedelta(seconds=1) <= first.published_at <= after + timedelta(seconds=1)
    # An older day (a backfill) is not published, so the answer does not move.
    publish_user_features(scoring([1], date(2026, 10, 3), 1.0), url)
    assert last_published(url) == first
    publish_user_features(scoring([1], date(2026, 11, 27), 1.0), url)
    newer = last_published(url)
    assert newer is not None and newer.as_of == date(2026, 11, 27)
    assert newer.published_at >= first.published_at
    with pytest.raises(PublishError, match="cannot read online features"):
        last_published("duckdb:///elsewhere.duckdb")


def test_a_source_url_libpq_cannot_parse_never_shows_its_password(paylater_home: Path) -> None:
    """libpq quotes a URL it cannot parse whole, password included: the error the feature build
    and the monitor log (and the monitor's check reason) must name the problem, not the secret."""
    import traceback

    from tasks.online import last_published, publish_user_features

    url = "postgresql://app:Wr0ngSecret@[::1]x/source"
    scoring = pa.table({"user_id": [1], "as_of": [date(2026, 11, 20)], "f": [1.0]})
    calls = [
        (lambda: last_published(url), psycopg.ProgrammingError),
        (lambda: publish_user_features(scoring, url), PublishError),
    ]
    for call, error in calls:
        with pytest.raises(error, match="unexpected character") as caught:
            call()
        printed = "".join(traceback.format_exception(caught.value))
        assert "Wr0ngSecret" not in printed and "[::1]x/source" in printed, printed


def fail_the_publish_at_its_primary_key(pg_url: str, action: str) -> None:
    """An event trigger running `action` (PL/pgSQL) when the publish adds its staging table's
    primary key: after the COPY, before the swap, in the middle of the publish's transaction."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION fail_publish() RETURNS event_trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {action}; END $$"
        )
        conn.execute(
            "CREATE EVENT TRIGGER fail_publish ON ddl_command_end WHEN TAG IN ('ALTER TABLE') "
            "EXECUTE FUNCTION fail_publish()"
        )


def stop_failing(pg_url: str) -> None:
    """Remove fail_the_publish_at_its_primary_key's trigger."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP EVENT TRIGGER fail_publish")


def assert_previous_features_whole(pg_url: str) -> None:
    """The table a first publish of users 1-3 as of 2026-07-14 left, and nothing beside it."""
    assert online_as_of(pg_url) == [(date(2026, 7, 14), 3)]
    with psycopg.connect(pg_url) as conn:
        staging = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'user_features_latest\\_\\_%'"
        ).fetchone()
    assert staging == (0,)


@pytest.mark.postgres
def test_a_publish_failing_on_a_full_disk_keeps_the_previous_table_and_says_so(
    pg_url: str, paylater_home: Path
) -> None:
    # A full disk (or any statement error) half way through came out as psycopg's bare
    # DiskFull, naming neither the table nor what the service is left with, and was retried.
    publish_user_features(scoring([1, 2, 3], date(2026, 7, 14), 1.0), pg_url)
    fail_the_publish_at_its_primary_key(
        pg_url,
        "RAISE EXCEPTION 'could not extend file: No space left on device' "
        "USING ERRCODE = 'disk_full'",
    )
    with pytest.raises(
        PublishError,
        match=r"user_features_latest for as_of 2026-07-15.*DiskFull: could not extend file"
        r".*still holds its previous features",
    ):
        publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), pg_url)
    stop_failing(pg_url)
    assert_previous_features_whole(pg_url)


@pytest.mark.postgres
def test_a_database_restart_during_a_publish_keeps_the_previous_table_and_is_retryable(
    pg_url: str, paylater_home: Path
) -> None:
    from tasks.online import PublishInterrupted

    publish_user_features(scoring([1, 2, 3], date(2026, 7, 14), 1.0), pg_url)
    # The server ends the publish's session half way, as a restart does.
    fail_the_publish_at_its_primary_key(pg_url, "PERFORM pg_terminate_backend(pg_backend_pid())")
    with pytest.raises(PublishInterrupted, match=r"rolled back.*previous features") as raised:
        publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), pg_url)
    assert not isinstance(raised.value, PublishError)  # feature_build retries it
    assert "secret" not in str(raised.value)
    stop_failing(pg_url)
    assert_previous_features_whole(pg_url)
    assert publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), pg_url) == 2


@pytest.mark.postgres
def test_a_role_without_the_privilege_to_publish_keeps_the_previous_table_and_says_so(
    pg_url: str, paylater_home: Path
) -> None:
    publish_user_features(scoring([1, 2, 3], date(2026, 7, 14), 1.0), pg_url)
    role = f"builder_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'role-s3cret'")
        conn.execute("GRANT SELECT ON user_features_latest TO PUBLIC")
    as_role = re.sub(r"//[^@]*@", f"//{role}:role-s3cret@", pg_url)
    try:
        with pytest.raises(
            PublishError,
            match=rf"InsufficientPrivilege: permission denied.*role {role}"
            r".*still holds its previous features",
        ) as raised:
            publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), as_role)
        assert "role-s3cret" not in str(raised.value)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
    assert_previous_features_whole(pg_url)


@pytest.mark.postgres
def test_a_session_holding_the_online_table_fails_the_publish_instead_of_stalling_readers(
    pg_url: str, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The swap waited without end for a session that had read the table (a report left open in
    # a transaction); queued behind its exclusive lock, every lookup of the service waited too.
    from tasks import online

    monkeypatch.setattr(online, "SWAP_LOCK_TIMEOUT_SECONDS", 0.2)
    publish_user_features(scoring([1, 2, 3], date(2026, 7, 14), 1.0), pg_url)
    with psycopg.connect(pg_url) as report:
        report.execute(
            "SELECT count(*) FROM user_features_latest"
        ).fetchall()  # idle in transaction
        with pytest.raises(
            online.PublishInterrupted,
            match=r"another session holds user_features_latest.*previous features",
        ):
            publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), pg_url)
        report.rollback()
    assert_previous_features_whole(pg_url)


def test_a_sqlite_publish_that_fails_half_way_keeps_the_previous_table_and_says_so(
    tmp_path: Path, paylater_home: Path
) -> None:
    from tasks.online import PublishInterrupted

    url = f"sqlite:///{tmp_path / 'source.db'}"
    publish_user_features(scoring([1, 2, 3], date(2026, 7, 14), 1.0), url)
    with sqlite3.connect(tmp_path / "source.db") as db:  # a statement of the publish fails
        db.execute("CREATE VIEW user_features_latest__new AS SELECT 1 AS x")
    with pytest.raises(
        PublishError,
        match=r"user_features_latest for as_of 2026-07-15.*OperationalError: .*view"
        r".*still holds its previous features",
    ):
        publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), url)
    assert online_as_of(url) == [("2026-07-14", 3)]
    with sqlite3.connect(tmp_path / "source.db") as db:
        db.execute("DROP VIEW user_features_latest__new")
    holder = sqlite3.connect(tmp_path / "source.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer, past the publish's busy timeout
        with pytest.raises(PublishInterrupted, match=r"database is locked.*previous features"):
            publish_user_features(scoring([4, 5], date(2026, 7, 15), 2.0), url)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert online_as_of(url) == [("2026-07-14", 3)]
