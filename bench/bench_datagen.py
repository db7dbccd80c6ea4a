"""Synthetic data: generation speed, and bulk loading (COPY) beside row-by-row INSERT, in one run.

Scale with BENCH_DATAGEN_USERS / BENCH_DATAGEN_MONTHS (defaults 5000 users x 3 months). Needs
PAYLATER_TEST_PG_URL (a superuser URL); creates and drops the database `bench_datagen_quick`.
Full scale: `paylater demo-data generate --users 100000 --months 12` against PostgreSQL.
"""

from __future__ import annotations

import os
import resource
import time
from datetime import date

import psycopg

from datagen import generate
from datagen.load import PostgresSource

_DB = "bench_datagen_quick"
_INSERT_SAMPLE = 20_000


def _admin_url() -> str:
    """The server URL from the environment."""
    url = os.environ.get("PAYLATER_TEST_PG_URL")
    if not url:
        raise RuntimeError("PAYLATER_TEST_PG_URL is unset: `source var/postgres.env` first")
    return url


def _cpu_seconds() -> float:
    """User + system CPU of this process so far (the machine is shared; wall time is noisy)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """Generate in memory, COPY every table, INSERT a sample row by row; print rates and ratios."""
    users = int(os.environ.get("BENCH_DATAGEN_USERS", "5000"))
    months = int(os.environ.get("BENCH_DATAGEN_MONTHS", "3"))
    admin = _admin_url()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{_DB}"')
        conn.execute(f'CREATE DATABASE "{_DB}"')
    url = f"{admin.rpartition('/')[0]}/{_DB}"
    try:
        started, cpu = time.perf_counter(), _cpu_seconds()
        data = generate(users, months, seed=1, end_date=date(2026, 10, 31))
        gen_s, gen_cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        rows = sum(data.row_counts().values())
        print(f"generate {users} users x {months} months: {rows:,} rows in {gen_s:.1f} s "
              f"({rows / gen_s:,.0f} rows/s, {gen_cpu:.1f} s CPU)")  # fmt: skip
        for table, n in data.row_counts().items():
            print(f"  {table:18} {n:>12,}")

        source = PostgresSource(url)
        source.ensure_schema()
        source.drop_indexes()
        tx = data.card_transactions
        started = time.perf_counter()
        source.append("card_transactions", tx)
        source.ensure_schema()
        source.commit()
        copy_s = time.perf_counter() - started
        copy_rate = tx.num_rows / copy_s
        print(
            f"COPY card_transactions: {tx.num_rows:,} rows in {copy_s:.1f} s ({copy_rate:,.0f} rows/s)"
        )

        sample = tx.slice(0, _INSERT_SAMPLE).to_pylist()
        columns = tx.column_names
        statement = (
            f"INSERT INTO card_transactions ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})"
        )
        source.conn.execute("TRUNCATE card_transactions")
        started = time.perf_counter()
        with source.conn.cursor() as cur:
            cur.executemany(statement, [tuple(r[c] for c in columns) for r in sample])
        source.commit()
        insert_rate = len(sample) / (time.perf_counter() - started)
        source.close()
        print(f"executemany INSERT (baseline): {len(sample):,} rows at {insert_rate:,.0f} rows/s")
        print(f"ratio COPY / INSERT: {copy_rate / insert_rate:.1f}x")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{_DB}" WITH (FORCE)')


if __name__ == "__main__":
    main()
