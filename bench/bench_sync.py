"""Sync of card_transactions from PostgreSQL into the DuckDB warehouse, beside two baselines.

In one run, on a table of N rows in its own database `bench_sync`:
  (b) COPY (SELECT ...) TO STDOUT (FORMAT binary) into nothing: the server's own export rate
      (the faster of psql into /dev/null and psycopg reading and dropping every row);
  (a) pandas.read_sql + DataFrame.to_parquet: the obvious alternative;
  the project: tasks.sync.sync_table, first sync (whole history into an empty warehouse, counts
  checked, ledger row), the same keeping the change history (keep_changes: a second write), then
  two incremental days with 1% new rows and updates of 0.1% of the old rows each: a realistic one
  (updates mostly of the last 4 weeks' rows) and a worst case (updates spread over the year), and
  a day without changes: the fixed cost of a run, whatever the table's size, and under it the
  floor: opening and closing the source connection and the warehouse file, nothing else. Each day
  is the median of 3 runs from the same warehouse state (copies of the file).
The bare day: the realistic day's rows read with ADBC into Arrow, deleted and inserted into a copy
of the warehouse file, committed, closed; no snapshot, counts, checks or ledger. It is what any
implementation of a day pays on this machine with these two databases, and shows how much of the
5% the goal allows is left to the project's own work.
Sizes: PAYLATER_BENCH_SYNC_ROWS (comma separated, default 1000000,10000000). The PostgreSQL server
is PAYLATER_TEST_PG_URL's (`source var/postgres.env`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg

from paylater.timeutil import day_end_utc

DATABASE = "bench_sync"
FIRST_DAY = date(2025, 11, 1)
LAST_DAY = date(2026, 10, 31)  # the full sync's as_of; the incremental day is the next one
COLUMNS = (
    "transaction_id, user_id, authorized_at, amount_jpy, merchant_id, merchant_category,"
    " channel, status, updated_at"
)
ROOT = Path(__file__).resolve().parents[1]


def server_url() -> str:
    """The benchmark server (the test server: `source var/postgres.env`)."""
    url = os.environ.get("PAYLATER_TEST_PG_URL")
    if not url:
        raise SystemExit("PAYLATER_TEST_PG_URL is unset: run `source var/postgres.env` first")
    return url


def fresh_database(url: str) -> str:
    """Drop and create the benchmark database; its URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    return f"{url.rpartition('/')[0]}/{DATABASE}"


def fill(url: str, rows: int) -> None:
    """card_transactions with `rows` rows over a year (ids increase with time), in one statement."""
    start = day_end_utc(FIRST_DAY - timedelta(days=1))
    span = (day_end_utc(LAST_DAY) - start).total_seconds()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((ROOT / "schema/source_postgres.sql").read_text())
        conn.execute("ALTER TABLE card_transactions DROP CONSTRAINT card_transactions_pkey")
        conn.execute("DROP INDEX card_transactions_updated_at")
        conn.execute("SET synchronous_commit = off")
        conn.execute(
            f"""
            INSERT INTO card_transactions ({COLUMNS})
            SELECT g, 1 + mod(g * 7919, 100000), t, 100 + mod(g * 31, 20000), 1 + mod(g * 13, 5000),
                   (ARRAY['grocery','convenience','dining','transport','online','travel'])[1 + mod(g, 6)],
                   (ARRAY['in_store','online','contactless'])[1 + mod(g, 3)],
                   CASE WHEN mod(g, 50) = 0 THEN 'refunded' WHEN mod(g, 97) = 0 THEN 'declined' ELSE 'settled' END,
                   t
            FROM generate_series(1::bigint, %(rows)s::bigint) AS g,
                 LATERAL (SELECT %(start)s::timestamptz
                          + make_interval(secs => (g - 0.5) * %(span)s / %(rows)s) AS t) AS at
            """,
            {"rows": rows, "start": start, "span": span},
        )
        conn.execute("ALTER TABLE card_transactions ADD PRIMARY KEY (transaction_id)")
        conn.execute("CREATE INDEX card_transactions_updated_at ON card_transactions (updated_at)")
        conn.execute("VACUUM ANALYZE card_transactions")
        settle(conn)


def settle(conn: psycopg.Connection) -> None:
    """Flush the preparation's dirty pages now, so the server's background writes of them do not
    fall inside the next timed run (CHECKPOINT needs a superuser or pg_checkpoint; skipped without)."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


def next_day(url: str, day: date, spread: bool) -> None:
    """One more business day: 1% new rows and updates of 0.1% of the old rows (refunds).

    Realistic (`spread` False): 90% of the updated rows were bought in the last 4 weeks and 10%
    anywhere in the year, as late changes cluster in production. Worst case (`spread` True):
    every update lands uniformly over the whole year, touching every part of the table.
    """
    day_start = day_end_utc(day - timedelta(days=1))
    with psycopg.connect(url, autocommit=True) as conn:
        top = conn.execute("SELECT max(transaction_id) FROM card_transactions").fetchone()
        old = top[0] if top else 0
        new = old // 100
        conn.execute(
            f"""
            INSERT INTO card_transactions ({COLUMNS})
            SELECT %(base)s + g, 1 + mod(g, 100000), t, 500, 1, 'grocery', 'online', 'settled', t
            FROM generate_series(1::bigint, %(new)s::bigint) AS g,
                 LATERAL (SELECT %(start)s::timestamptz + make_interval(secs => g * 80000.0 / %(new)s) AS t) AS at
            """,
            {"base": old, "new": new, "start": day_start},
        )
        if spread:
            where, params = "mod(transaction_id, 1000) = 7", {}
        else:
            # ids rise with time: the last 4 weeks are the top 28/365 of the id range.
            recent = old * 28 // 365
            where = (
                "(transaction_id > %(recent_from)s AND mod(transaction_id, %(every)s) = 7)"
                " OR mod(transaction_id, 10000) = 7"
            )
            params = {
                "recent_from": old - recent,
                "every": max(1, recent * 1000 // (old * 9 // 10)),
            }
        conn.execute(
            "UPDATE card_transactions SET status = 'refunded', updated_at = %(at)s"
            f" WHERE ({where}) AND transaction_id <= %(old)s",
            {"at": day_start + timedelta(hours=3), "old": old, **params},
        )
        conn.execute("VACUUM ANALYZE card_transactions")
        settle(conn)


def timed(run: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def copy_binary_psql(url: str) -> None:
    """(b) The server's binary export through psql into /dev/null (C all the way). The password
    goes to psql in its environment, not on its command line, where `ps` would show it."""
    parts = urlsplit(url)
    env = dict(os.environ)
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        url = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", "@")))
    with open(os.devnull, "wb") as devnull:
        subprocess.run(
            [
                "psql",
                "--no-psqlrc",
                "-q",
                "-d",
                url,
                "-c",
                f"COPY (SELECT {COLUMNS} FROM card_transactions) TO STDOUT (FORMAT binary)",
            ],
            stdout=devnull,
            env=env,
            check=True,
        )


def copy_binary(url: str) -> None:
    """(b) The server's binary export read through psycopg and thrown away."""
    with (
        psycopg.connect(url) as conn,
        conn.cursor() as cur,
        cur.copy(
            f"COPY (SELECT {COLUMNS} FROM card_transactions) TO STDOUT (FORMAT binary)"
        ) as copy,
    ):
        for _ in copy:
            pass


def pandas_parquet(url: str, out: Path) -> None:
    """(a) pandas.read_sql over SQLAlchemy, then to_parquet."""
    import pandas as pd
    import sqlalchemy

    engine = sqlalchemy.create_engine("postgresql+psycopg://" + url.partition("://")[2])
    try:
        frame = pd.read_sql(f"SELECT {COLUMNS} FROM card_transactions", engine)
        frame.to_parquet(out)
    finally:
        engine.dispose()


def project_sync(
    url: str,
    warehouse_path: Path,
    as_of: date,
    mode: Literal["full", "incremental"] = "incremental",
    keep_changes: bool | None = None,
) -> int:
    """The project's sync of card_transactions for `as_of`; rows extracted.

    `keep_changes`: override the configured change history (None: as configured).
    """
    from dataclasses import replace

    from tasks.extract import open_source
    from tasks.sync import configured_tables, sync_table, validate_tables
    from tasks.warehouse import open_warehouse

    source = open_source(url)
    warehouse = open_warehouse(f"duckdb:///{warehouse_path}")
    try:
        configured = next(s for s in configured_tables() if s.name == "card_transactions")
        (spec,) = validate_tables(source, [replace(configured, mode=mode)])
        if keep_changes is not None:
            spec = replace(spec, keep_changes=keep_changes)
        result = sync_table(source, warehouse, spec, as_of)
        return result.rows_extracted or 0
    finally:
        warehouse.close()
        source.close()


DAY_ROUNDS = 3


def timed_day(url: str, warehouse: Path, day: date) -> float:
    """Median seconds of one day's sync over DAY_ROUNDS runs from the same warehouse state: the
    first runs on copies of the file (each thrown away), the last on the file itself, which then
    holds the day. A day is half a second, where one stall of the machine would otherwise decide
    the figure; the source is only read, so every run does the same work."""
    return median_on_copies(lambda path: project_sync(url, path, day), warehouse, keep_last=True)


def median_on_copies(run: Callable[[Path], object], warehouse: Path, keep_last: bool) -> float:
    """Median seconds of `run(file)` over DAY_ROUNDS runs, each on a fresh copy of `warehouse`
    (thrown away), except the last on `warehouse` itself when `keep_last`."""
    seconds = []
    for attempt in range(DAY_ROUNDS):
        if keep_last and attempt == DAY_ROUNDS - 1:
            seconds.append(timed(partial(run, warehouse)))
            continue
        copy = warehouse.with_name(f"day_copy_{attempt}.duckdb")
        shutil.copy(warehouse, copy)
        seconds.append(timed(partial(run, copy)))
        copy.unlink()
    return statistics.median(seconds)


def bare_day(url: str, warehouse_path: Path, day: date) -> None:
    """The least a day can do: read the day's changed rows, replace them in the warehouse file,
    commit, close. No snapshot, source counts, key or count checks, ledger or change history."""
    import adbc_driver_postgresql.dbapi
    import duckdb

    start, end = day_end_utc(day - timedelta(days=1)), day_end_utc(day)
    query = (
        f"SELECT {COLUMNS} FROM card_transactions WHERE updated_at >= '{start.isoformat()}'"
        f"::timestamptz AND updated_at < '{end.isoformat()}'::timestamptz"
    )
    with adbc_driver_postgresql.dbapi.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query)
        increment = cur.fetch_arrow_table()
    warehouse = duckdb.connect(str(warehouse_path))
    try:
        warehouse.register("increment", increment)
        warehouse.execute("BEGIN")
        warehouse.execute(
            "DELETE FROM card_transactions"
            " WHERE transaction_id IN (SELECT transaction_id FROM increment)"
        )
        warehouse.execute(
            f"INSERT INTO card_transactions ({COLUMNS}) SELECT {COLUMNS} FROM increment"
        )
        warehouse.execute("COMMIT")
    finally:
        warehouse.close()


def timed_bare_day(url: str, warehouse: Path, day: date) -> float:
    """Median seconds of the bare day over DAY_ROUNDS runs, each on a copy of the warehouse."""
    return median_on_copies(lambda path: bare_day(url, path, day), warehouse, keep_last=False)


def open_and_close(url: str, warehouse_path: Path) -> None:
    """What every run pays before any work: the source connection (the driver's database object
    and the session) and the warehouse file, opened and closed."""
    from tasks.extract import open_source
    from tasks.warehouse import open_warehouse

    open_source(url).close()
    open_warehouse(f"duckdb:///{warehouse_path}").close()


def bench_size(url: str, rows: int, workdir: Path) -> dict[str, float]:
    """Fill, then time (a), (b), the first sync (with and without change history) and two days."""
    # Imported before the clock starts: a deployment's worker process has them loaded.
    import adbc_driver_postgresql.dbapi  # noqa: F401

    import tasks.sync  # noqa: F401

    started = time.perf_counter()
    fill(url, rows)
    print(f"  filled {rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
    repeats = 2 if rows <= 2_000_000 else 1
    # pandas first: it fills most of the memory, evicting the page cache; everything after it
    # (the baseline, the first sync and the days it is compared with) starts from one cache state.
    figures = {"pandas": timed(lambda: pandas_parquet(url, workdir / "pandas.parquet"))}
    # (b) is the faster of psql into /dev/null and psycopg (both only receive the rows).
    copies = [partial(copy_binary, url)]
    if shutil.which("psql"):
        copies.append(partial(copy_binary_psql, url))
    figures["copy_binary"] = min(timed(copy) for copy in copies for _ in range(repeats))
    full_runs = []
    for attempt in range(repeats):
        warehouse = workdir / f"full_{rows}_{attempt}.duckdb"
        full_runs.append(timed(partial(project_sync, url, warehouse, LAST_DAY)))
    figures["sync_full"] = min(full_runs)
    kept = workdir / f"kept_{rows}.duckdb"
    figures["sync_kept"] = timed(lambda: project_sync(url, kept, LAST_DAY, keep_changes=True))
    kept.unlink()
    day = LAST_DAY + timedelta(days=1)
    next_day(url, day, spread=False)
    # Before the project's day, which writes the day into the file the bare day copies.
    figures["bare_day"] = timed_bare_day(url, warehouse, day)
    figures["sync_day"] = timed_day(url, warehouse, day)
    day += timedelta(days=1)
    next_day(url, day, spread=True)
    figures["sync_day_spread"] = timed_day(url, warehouse, day)
    # A day without a single change: what every run costs whatever the table's size (connections,
    # snapshot, DuckDB open, SQL transpiles, checks, ledger, commit, checkpoint).
    day += timedelta(days=1)
    figures["sync_day_empty"] = timed_day(url, warehouse, day)
    # The floor under any run: median of 5 (the first sync's file, so DuckDB reads a real catalog).
    figures["open_close"] = statistics.median(
        timed(partial(open_and_close, url, warehouse)) for _ in range(5)
    )
    for path in workdir.glob("*.duckdb"):
        path.unlink()
    return figures


def report(rows: int, f: dict[str, float]) -> list[str]:
    """Printed lines (and the markdown table row) for one size."""
    rate = lambda seconds: rows / seconds / 1e6  # noqa: E731
    lines = [
        ("(b) COPY binary -> /dev/null", "copy_binary"),
        ("(a) pandas read_sql+parquet", "pandas"),
        ("project first sync -> DuckDB", "sync_full"),
        ("first sync keeping changes", "sync_kept"),
    ]
    for label, key in lines:
        print(f"  {label:<30}: {f[key]:7.2f} s  {rate(f[key]):5.2f} M rows/s")
    print(f"  incremental day (realistic)   : {f['sync_day']:7.2f} s")
    print(f"  incremental day (worst case)  : {f['sync_day_spread']:7.2f} s")
    print(f"  day without changes (fixed)   : {f['sync_day_empty']:7.2f} s")
    print(f"  bare day (read, replace, commit; no checks): {f['bare_day']:7.2f} s")
    vs_copy = f["copy_binary"] / f["sync_full"]
    vs_pandas = f["pandas"] / f["sync_full"]
    day_share = f["sync_day"] / f["sync_full"]
    spread_share = f["sync_day_spread"] / f["sync_full"]
    print(f"  ratio first sync vs (b): {vs_copy:.2f}x   (goal >= 0.70x)")
    print(f"  ratio first sync vs (a): {vs_pandas:.1f}x   (goal >= 10x)")
    print(f"  incremental day / first sync: {day_share:.1%}   (goal <= 5%)")
    print(f"  worst-case day / first sync: {spread_share:.1%}")
    bare_share = f["bare_day"] / f["sync_full"]
    print(
        f"  bare day / first sync: {bare_share:.1%} (the floor under any day here);"
        f" project day / bare day: {f['sync_day'] / f['bare_day']:.2f}x"
    )
    marginal = (f["sync_day"] - f["sync_day_empty"]) / (f["sync_full"] - f["sync_day_empty"])
    print(f"  day / first sync, each less the fixed per-run cost: {marginal:.1%}")
    print(
        f"  opening and closing the source and the warehouse alone: {f['open_close'] * 1000:.0f} ms"
        f" = {f['open_close'] / f['sync_full']:.1%} of the first sync"
    )
    return [
        f"| {rows:,} | {f['copy_binary']:.2f} s | {f['pandas']:.2f} s | {f['sync_full']:.2f} s "
        f"| {f['sync_kept']:.2f} s | {f['sync_day']:.2f} s | {f['sync_day_spread']:.2f} s "
        f"| {f['sync_day_empty']:.2f} s | {vs_copy:.2f}x | {vs_pandas:.1f}x | {day_share:.1%} "
        f"| {spread_share:.1%} | {marginal:.1%} | {f['open_close'] * 1000:.0f} ms "
        f"| {f['bare_day']:.2f} s | {bare_share:.1%} |"
    ]


def main() -> None:
    """Run every size and print the markdown rows for docs/benchmarks.md."""
    sizes = [
        int(s) for s in os.environ.get("PAYLATER_BENCH_SYNC_ROWS", "1000000,10000000").split(",")
    ]
    url = fresh_database(server_url())
    rows_md = []
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        for rows in sizes:
            print(
                f"card_transactions, {rows:,} rows ({datetime.now(UTC):%H:%M:%S} UTC)", flush=True
            )
            rows_md += report(rows, bench_size(url, rows, Path(tmp)))
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "DROP TABLE IF EXISTS card_transactions, users, topups, deferred_charges"
                )
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    print(
        "\n| rows | (b) COPY binary | (a) pandas+parquet | first sync | first sync keeping changes "
        "| incremental day | worst-case day | day without changes | first vs (b) | first vs (a) "
        "| day/first | worst day/first | day/first less fixed cost | open + close | bare day "
        "| bare day/first |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_md))


if __name__ == "__main__":
    main()
