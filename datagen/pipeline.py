"""Generate or advance the synthetic world and write it out: source DB, warehouse app events, truth."""

from __future__ import annotations

import contextlib
import queue
import secrets
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
    ID_COLUMNS,
    SourceDB,
    SourceNotEmpty,
    database_errors,
    open_source,
    redact,
    split_by_day,
    write_app_event_days,
)
from datagen.tables import charges_table, truth_table, users_table
from paylater.redaction import safe_cause

TRUTH_FILE = "deferred_charges.parquet"
STATE_FOLDER = "generator"
APP_EVENTS = "app_events"
NEXT_APP_EVENTS = "app_events_generating"
"""Where a generate writes its app events until its source rows are committed (then renamed)."""


class GenerateIncomplete(RuntimeError):
    """A generate committed its source rows but not its warehouse events, truth or state."""


class AdvanceStopped(RuntimeError):
    """An advance failed part-way (a database error, a full disk); what it committed is kept."""


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
    recovered: list[date] = field(default_factory=list)
    """Days an interrupted run had committed to the source; their state and truth caught up."""
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [
            f"days       {self.first_day} .. {self.last_day} (business days, {self.zone})",
            f"source     {redact(self.source)}",
            f"warehouse  {redact(self.warehouse)} (app_events, one partition per day)",
            f"truth      {self.truth}",
        ]
        if self.recovered:
            days = ", ".join(d.isoformat() for d in self.recovered)
            out.append(
                f"recovered  {days} (in the source already; an earlier run stopped before"
                " saving its state)"
            )
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
    started = time.perf_counter()
    with _opened(source_url, warehouse_url) as (source, warehouse):
        source.ensure_schema()
        source.commit()
        _refuse_or_clear(source, replace)
        # Indexes are built once at the end: cheaper than maintaining them row by row.
        source.drop_indexes()
        # The new world's events go beside app_events, which keeps the previous world's until
        # the source has committed the new one: a run failing before that changes nothing.
        if warehouse.table_exists(NEXT_APP_EVENTS):  # left by a generate that died
            warehouse.execute(f"DROP TABLE {NEXT_APP_EVENTS}")
        sim, plan = Simulation.begin(users, months, seed, end_date, zone)
        report = WriteReport(
            source_url, warehouse_url, str(truth_dir / TRUTH_FILE), sim.last_day, end_date, zone
        )
        report.first_day = date.fromordinal(sim.last_day.toordinal() + 1)
        try:
            _stream(sim.run(plan, end_date), source, warehouse, report.inserted)
            users_rows = sim.users_table(end_date)
            source.append("users", users_rows)
            report.inserted = {"users": users_rows.num_rows, **report.inserted}
            source.ensure_schema()
            # A new world id, committed with its rows: an advance refuses a state of another
            # world (this generate dying before it saved its state leaves the previous world's).
            sim.meta.world = secrets.token_hex(8)
            source.record_progress(sim.meta.world, None, end_date)
            source.commit()
        except BaseException:
            _drop_quietly(warehouse, NEXT_APP_EVENTS)  # nothing of the new world is kept
            raise
        # The two stores cannot commit together: the warehouse follows the source, and the
        # state, which lets advance run, comes last. Any failure from here leaves a source whose
        # world no state names, which advance refuses until a generate --replace runs again.
        try:
            _swap_in_app_events(warehouse)
            _persist(sim, truth_dir)
        except Exception as exc:
            raise GenerateIncomplete(
                f"generate stopped after committing the new world to source {redact(source_url)}"
                f" ({type(exc).__name__}: {exc}); the warehouse's app_events, the truth or the"
                " generator state may still be the previous world's, and advance refuses to run"
                " until `paylater demo-data generate --replace` is run again"
            ) from exc
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def _opened(source_url: str, warehouse_url: str) -> Iterator[tuple[SourceDB, Any]]:
    """The source and the warehouse, both closed on the way out (the source too if the
    warehouse cannot be opened)."""
    from tasks.warehouse import open_warehouse

    with contextlib.ExitStack() as stack:
        source = open_source(source_url)
        stack.callback(source.close)
        warehouse = open_warehouse(warehouse_url)
        stack.callback(warehouse.close)
        yield source, warehouse


def _drop_quietly(warehouse: Any, table: str) -> None:
    """Drop `table` if the warehouse lets us (the next generate drops it otherwise)."""
    # Exception: the warehouse may be what failed; the error being raised is the one to report.
    with contextlib.suppress(Exception):
        if warehouse.table_exists(table):
            warehouse.execute(f"DROP TABLE {table}")


def _swap_in_app_events(warehouse: Any) -> None:
    """Replace app_events with the table the generate wrote, in one step where the warehouse can."""
    if not warehouse.table_exists(NEXT_APP_EVENTS):  # a world without a single app event
        if warehouse.table_exists(APP_EVENTS):
            warehouse.execute(f"DROP TABLE {APP_EVENTS}")
        return
    if warehouse.dialect == "bigquery":
        # DDL cannot run in a BigQuery transaction; a table copy replaces the table atomically
        # and keeps its day partitioning. A failure before the drop leaves the copy to redo.
        warehouse.execute(f"CREATE OR REPLACE TABLE {APP_EVENTS} COPY {NEXT_APP_EVENTS}")
        warehouse.execute(f"DROP TABLE {NEXT_APP_EVENTS}")
        return
    with warehouse.transaction():  # DuckDB: DDL is transactional, and a rename copies nothing
        warehouse.execute(f"DROP TABLE IF EXISTS {APP_EVENTS}")
        warehouse.execute(f"ALTER TABLE {NEXT_APP_EVENTS} RENAME TO {APP_EVENTS}")


def _stream(chunks: Iterator[Chunk], source: Any, warehouse: Any, inserted: dict[str, int]) -> None:
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
                events = write_app_event_days(warehouse, chunk.app_events, NEXT_APP_EVENTS)
                inserted["app_events"] += events
            except BaseException as exc:  # re-raised on the generating thread below
                failure.append(exc)

    thread = threading.Thread(target=loader, name="datagen-loader", daemon=True)
    thread.start()
    try:
        for chunk in chunks:
            if failure:
                break
            pending.put(chunk)
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]


def advance_into(days: int, source_url: str, warehouse_url: str, truth_dir: Path) -> WriteReport:
    """Simulate `days` more business days after the latest one, with status changes of old rows.

    Each day's rows and its progress record are committed together, then truth and state are
    saved: a run killed between the two leaves the source a day ahead of the state, and the next
    run simulates that day again without writing it (the same seed gives the same rows) before
    adding its own.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    started = time.perf_counter()
    state = truth_dir / STATE_FOLDER
    sim = Simulation.load(state)
    with _opened(source_url, warehouse_url) as (source, warehouse):
        if not any(source.row_counts().values()):
            raise SourceNotEmpty(
                f"source {redact(source_url)} is empty: run `paylater demo-data generate` first"
            )
        committed = _committed_day(source, sim, state)
        first = date.fromordinal(committed.toordinal() + 1)
        report = WriteReport(
            source_url, warehouse_url, str(truth_dir / TRUTH_FILE), first, first, sim.meta.zone
        )
        saving = False  # whether truth and state were being saved when it failed
        try:
            while sim.last_day < committed:
                saving = False
                _advance_one_day(sim, None, warehouse, report)
                report.recovered.append(sim.last_day)
                saving = True
                _persist(sim, truth_dir)
            for _ in range(days):
                saving = False
                _advance_one_day(sim, source, warehouse, report)
                committed = report.last_day = sim.last_day
                # State and truth follow every day the source committed: should a later day
                # fail, the next advance resumes after the last day the source holds.
                saving = True
                _persist(sim, truth_dir)
        except _stopping_errors() as exc:
            reason = redact(" ".join(f"{type(exc).__name__}: {exc}".split()))
            if saving:  # a disk error there names no file: say which folder
                reason += f", saving the truth and generator state in {truth_dir}"
            raise AdvanceStopped(
                f"advance stopped ({reason}); source {redact(source_url)} holds every day through"
                f" {committed}, and the next `paylater demo-data advance` resumes after it"
                " without writing a day twice: run it again once the cause is fixed"
            ) from safe_cause(exc)
    report.seconds = time.perf_counter() - started
    return report


def _stopping_errors() -> tuple[type[BaseException], ...]:
    """Failures of a database or a disk that an advance reports and a later one recovers from."""
    import duckdb

    from tasks.warehouse import WarehouseError

    return (OSError, *database_errors(), duckdb.Error, WarehouseError)


def _committed_day(source: SourceDB, sim: Simulation, state: Path) -> date:
    """The last day the source holds of this state's world (the state's own day on a source
    generated before days were recorded there)."""
    progress = source.progress()
    if progress is None:
        # A source of an earlier release, which recorded no days: it may be ahead of the state
        # (that release's advance stopped between its commit and its state save), which shows
        # as an id the state has not handed out yet. Writing on would collide with that day.
        ahead = [
            table
            for table, last in source.last_ids().items()
            if last >= getattr(sim.counters, ID_COLUMNS[table])
        ]
        if ahead:
            raise ValueError(
                f"source {redact(source.url)} was written by an earlier release and holds rows"
                f" ({', '.join(ahead)}) the generator state at {state}, which ends on"
                f" {sim.last_day}, has not simulated: that release's advance stopped before"
                " saving its state,"
                " and the source does not say which days it committed; restore the state saved"
                " with the source, or run `paylater demo-data generate --replace`"
            )
        return sim.last_day
    if progress.world != sim.meta.world:
        raise ValueError(
            f"the generator state at {state} is not of the world in source"
            f" {redact(source.url)} (generated through {progress.last_day}): the generate that"
            " wrote the source stopped before saving its state, or the state belongs to another"
            " source; run `paylater demo-data generate --replace` again"
        )
    if progress.last_day < sim.last_day:
        raise ValueError(
            f"source {redact(source.url)} ends on {progress.last_day} but the generator state at"
            f" {state} on {sim.last_day}: the source was restored or rolled back; restore the state"
            " saved with it, or run `paylater demo-data generate --replace`"
        )
    return progress.last_day


def _persist(sim: Simulation, truth_dir: Path) -> None:
    """Truth, then state (each atomic): truth is never behind the state, and neither is behind
    the source once this returns."""
    from tasks.storage import write_file_atomically

    # The state holds every charge with its true probability: the truth is derived from it, in
    # the order the charges were simulated, rather than appended to (a re-run day would repeat).
    truth = truth_table(sim.charges)
    write_file_atomically(truth_dir / TRUTH_FILE, lambda handle: pq.write_table(truth, handle))
    sim.save(truth_dir / STATE_FOLDER)


def _advance_one_day(
    sim: Simulation, source: SourceDB | None, warehouse: Any, report: WriteReport
) -> None:
    """Simulate the next day; with a source, commit its new rows, the updates falling due in it
    and its progress record together (the day's app events written just before). Without one
    (a day the source holds already), only its app events are written again."""
    previous = sim.last_day
    day = date.fromordinal(previous.toordinal() + 1)
    t0 = sim.clock.start_us(day.toordinal())
    t1 = sim.clock.start_us(day.toordinal() + 1)
    updates = _status_changes(sim, t0, t1)
    rate = sim.meta.signup_rate
    signups = np.random.default_rng([sim.meta.seed, day.toordinal(), 3]).poisson(rate)
    n_before = len(sim.pop)
    (chunk,) = list(sim.run(np.array([signups]), day))
    new_users = users_table(sim.pop, t1, np.arange(n_before, len(sim.pop)))
    # App events first: they replace their day's partition, so a day that fails after them is
    # simply written again, while the source commit is what makes the day count as done.
    events = write_app_event_days(warehouse, chunk.app_events)
    if source is None:
        return
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
    report.inserted["app_events"] = report.inserted.get("app_events", 0) + events
    source.record_progress(sim.meta.world, previous, day)
    source.commit()


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
