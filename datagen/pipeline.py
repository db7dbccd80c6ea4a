"""Generate or advance the synthetic world and write it out: source DB, warehouse app events, truth."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.generator import Chunk, Simulation, SourceData
from datagen.load import (
    SourceNotEmpty,
    open_source,
    redact,
    split_by_day,
    write_app_event_days,
)
from datagen.tables import TRUTH, charges_table, users_table

TRUTH_FILE = "deferred_charges.parquet"
STATE_FOLDER = "generator"


@dataclass
class WriteReport:
    """What a generate or advance run wrote, and where."""

    source: str
    warehouse: str
    truth: str
    first_day: date
    last_day: date
    zone: str = "Asia/Tokyo"
    inserted: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [
            f"days       {self.first_day} .. {self.last_day} (business days, {self.zone})",
            f"source     {redact(self.source)}",
            f"warehouse  {redact(self.warehouse)} (app_events, one partition per day)",
            f"truth      {self.truth}",
        ]
        for table, rows in self.inserted.items():
            extra = f", {self.updated[table]:,} updated" if table in self.updated else ""
            out.append(f"  {table:18} {rows:>12,} inserted{extra}")
        out.append(f"took {self.seconds:.1f} s")
        return out


def load(source_url: str, data: SourceData, replace: bool = False) -> dict[str, int]:
    """Bulk-load generated source tables (schema created if missing); refuses a non-empty source."""
    source = open_source(source_url)
    try:
        source.ensure_schema()
        source.commit()
        _refuse_or_clear(source, replace)
        source.drop_indexes()
        for table, rows in data.source_tables().items():
            source.append(table, rows)
        source.ensure_schema()
        source.commit()
        return source.row_counts()
    finally:
        source.close()


def write_app_events(warehouse_url: str, table: pa.Table) -> int:
    """Write app events into the warehouse, replacing each business day's partition they cover."""
    from tasks.warehouse import open_warehouse

    warehouse = open_warehouse(warehouse_url)
    try:
        return write_app_event_days(warehouse, split_by_day(table))
    finally:
        warehouse.close()


def _refuse_or_clear(source: Any, replace: bool) -> None:
    """Clear the source when asked to; otherwise refuse to write over existing rows."""
    counts = source.row_counts()
    if any(counts.values()) and not replace:
        held = ", ".join(f"{t}={n:,}" for t, n in counts.items() if n)
        raise SourceNotEmpty(
            f"source {redact(source.url)} already holds data ({held}); pass --replace to overwrite it"
        )
    if any(counts.values()):
        source.clear()


def generate_into(
    users: int,
    months: int,
    seed: int,
    end_date: date,
    zone: str,
    source_url: str,
    warehouse_url: str,
    truth_dir: Path,
    replace: bool = False,
) -> WriteReport:
    """Simulate and stream month-sized chunks into the source while the next chunk is generated."""
    from tasks.warehouse import open_warehouse

    started = time.perf_counter()
    source = open_source(source_url)
    warehouse = open_warehouse(warehouse_url)
    try:
        source.ensure_schema()
        source.commit()
        _refuse_or_clear(source, replace)
        # Indexes are built once at the end: cheaper than maintaining them row by row.
        source.drop_indexes()
        if replace and warehouse.table_exists("app_events"):
            warehouse.execute("DROP TABLE app_events")
        sim, plan = Simulation.begin(users, months, seed, end_date, zone)
        report = WriteReport(
            source_url, warehouse_url, str(truth_dir / TRUTH_FILE), sim.last_day, end_date, zone
        )
        report.first_day = date.fromordinal(sim.last_day.toordinal() + 1)
        truth = _stream(sim.run(plan, end_date), source, warehouse, report.inserted)
        users_rows = sim.users_table(end_date)
        source.append("users", users_rows)
        report.inserted = {"users": users_rows.num_rows, **report.inserted}
        source.ensure_schema()
        source.commit()
        state = truth_dir / STATE_FOLDER
        if state.exists():
            shutil.rmtree(state)
        sim.save(state)
        pq.write_table(pa.concat_tables([TRUTH.empty_table(), *truth]), truth_dir / TRUTH_FILE)
    finally:
        source.close()
        warehouse.close()
    report.seconds = time.perf_counter() - started
    return report


def _stream(
    chunks: Iterator[Chunk], source: Any, warehouse: Any, inserted: dict[str, int]
) -> list[pa.Table]:
    """Load chunks on a second thread (COPY and DuckDB release the GIL) while generating the next."""
    pending: queue.Queue[Chunk | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []
    for table in ("card_transactions", "topups", "deferred_charges", "app_events"):
        inserted[table] = 0

    def loader() -> None:
        """Drain the queue into the databases; remember the first failure."""
        while (chunk := pending.get()) is not None:
            if failure:
                continue
            try:
                for table in ("card_transactions", "topups", "deferred_charges"):
                    rows = getattr(chunk, table)
                    source.append(table, rows)
                    inserted[table] += rows.num_rows
                inserted["app_events"] += write_app_event_days(warehouse, chunk.app_events)
            except BaseException as exc:  # re-raised on the generating thread below
                failure.append(exc)

    thread = threading.Thread(target=loader, name="datagen-loader", daemon=True)
    thread.start()
    truth = []
    try:
        for chunk in chunks:
            if failure:
                break
            truth.append(chunk.truth)
            pending.put(chunk)
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return truth


def advance_into(days: int, source_url: str, warehouse_url: str, truth_dir: Path) -> WriteReport:
    """Simulate `days` more business days after the latest one, with status changes of old rows."""
    from tasks.warehouse import open_warehouse

    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    started = time.perf_counter()
    sim = Simulation.load(truth_dir / STATE_FOLDER)
    first = date.fromordinal(sim.last_day.toordinal() + 1)
    report = WriteReport(
        source_url, warehouse_url, str(truth_dir / TRUTH_FILE), first, first, sim.meta.zone
    )
    source = open_source(source_url)
    warehouse = open_warehouse(warehouse_url)
    truth = [pq.read_table(truth_dir / TRUTH_FILE)]
    try:
        if not any(source.row_counts().values()):
            raise SourceNotEmpty(
                f"source {redact(source_url)} is empty: run `paylater demo-data generate` first"
            )
        for _ in range(days):
            truth.append(_advance_one_day(sim, source, warehouse, report))
            report.last_day = sim.last_day
            # State and truth follow every day the source committed: should a later day fail,
            # the next advance resumes after the last day the source holds instead of
            # simulating it again on top of its own rows.
            sim.save(truth_dir / STATE_FOLDER)
            pq.write_table(pa.concat_tables(truth), truth_dir / TRUTH_FILE)
    finally:
        source.close()
        warehouse.close()
    report.seconds = time.perf_counter() - started
    return report


def _advance_one_day(sim: Simulation, source: Any, warehouse: Any, report: WriteReport) -> pa.Table:
    """New rows of the next day plus the updates falling due in it, committed together (the
    day's app events written just before)."""
    day = date.fromordinal(sim.last_day.toordinal() + 1)
    t0 = sim.clock.start_us(day.toordinal())
    t1 = sim.clock.start_us(day.toordinal() + 1)
    updates = _status_changes(sim, t0, t1)
    rate = sim.meta.signup_rate
    signups = np.random.default_rng([sim.meta.seed, day.toordinal(), 3]).poisson(rate)
    n_before = len(sim.pop)
    (chunk,) = list(sim.run(np.array([signups]), day))
    new_users = users_table(sim.pop, t1, np.arange(n_before, len(sim.pop)))
    inserts = {
        "users": new_users,
        "card_transactions": chunk.card_transactions,
        "topups": chunk.topups,
        "deferred_charges": chunk.deferred_charges,
    }
    for table, rows in inserts.items():
        source.append(table, rows)
        report.inserted[table] = report.inserted.get(table, 0) + rows.num_rows
    for table, rows in updates.items():
        source.update(table, rows)
        report.updated[table] = report.updated.get(table, 0) + rows.num_rows
    # App events first: they replace their day's partition, so a day that fails after them is
    # simply written again, while the source commit is what makes the day count as done.
    report.inserted["app_events"] = report.inserted.get("app_events", 0) + write_app_event_days(
        warehouse, chunk.app_events
    )
    source.commit()
    return chunk.truth


def _status_changes(sim: Simulation, t0: int, t1: int) -> dict[str, pa.Table]:
    """Rows created earlier whose status changes during [t0, t1): refunds, repayments, defaults, users."""
    refunds = sim.pending_refunds
    refund_us = refunds.column("refund_us").to_numpy()
    due = (refund_us >= t0) & (refund_us < t1)
    sim.pending_refunds = refunds.filter(pa.array(refund_us >= t1))
    refunded = refunds.filter(pa.array(due))
    transactions = pa.table(
        {
            "status": pa.array(["refunded"] * refunded.num_rows, pa.string()),
            "updated_at": refunded.column("refund_us").cast(pa.timestamp("us", tz="UTC")),
            "transaction_id": refunded.column("transaction_id"),
        }
    )
    charges = sim.charges
    if charges:
        changed = ((charges["repaid_us"] >= t0) & (charges["repaid_us"] < t1)) | (
            (charges["default_us"] >= t0) & (charges["default_us"] < t1)
        )
        rows = charges_table({k: v[changed] for k, v in charges.items()}, t1)
    else:
        rows = charges_table({}, t1)
    deferred = rows.select(["status", "repaid_at", "days_late", "updated_at", "charge_id"])
    pop = sim.pop
    day = sim.last_day.toordinal() + 1
    touched = (pop.signup_day < day) & (
        ((pop.verified_us >= t0) & (pop.verified_us < t1))
        | ((pop.churn_us >= t0) & (pop.churn_us < t1))
    )
    users = users_table(pop, t1, np.flatnonzero(touched)).select(
        ["identity_verified_at", "status", "updated_at", "user_id"]
    )
    return {"card_transactions": transactions, "deferred_charges": deferred, "users": users}
