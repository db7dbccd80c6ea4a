"""The simulation over many days: sign-up plan, month-sized chunks of rows, state kept for `advance`."""

from __future__ import annotations

import calendar
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datagen.clock import HOURLY_APP, BusinessClock
from datagen.population import Population, new_users
from datagen.simulate import Counters, DaySimulator
from datagen.tables import (
    app_events_table,
    charges_table,
    concat_columns,
    topups_table,
    transactions_table,
    truth_table,
    users_table,
)

STATE_VERSION = 2  # 2: per-day windows replace the averages in the saved population
META_FILE = "meta.json"
STATE_TABLES = ("population", "charges", "pending_refunds")
PRE_WINDOW_SHARE = 0.55
PRE_WINDOW_DAYS = 900
"""Users present on the first day signed up within this many days before it."""
"""Share of the requested users who signed up before the simulated window (the rest join during it)."""


@dataclass
class SourceData:
    """Source tables (Arrow, warehouse types), the warehouse's app events and the hidden truth."""

    users: pa.Table
    card_transactions: pa.Table
    topups: pa.Table
    deferred_charges: pa.Table
    app_events: pa.Table
    truth: pa.Table

    def source_tables(self) -> dict[str, pa.Table]:
        """The four operational tables by name."""
        return {
            "users": self.users,
            "card_transactions": self.card_transactions,
            "topups": self.topups,
            "deferred_charges": self.deferred_charges,
        }

    def row_counts(self) -> dict[str, int]:
        """Rows per table."""
        return {
            **{k: v.num_rows for k, v in self.source_tables().items()},
            "app_events": self.app_events.num_rows,
        }


@dataclass
class Chunk:
    """Rows born during a block of days, as they stand at the simulation horizon."""

    card_transactions: pa.Table
    topups: pa.Table
    deferred_charges: pa.Table
    app_events: list[tuple[date, pa.Table]]
    truth: pa.Table


@dataclass
class Meta:
    """What `advance` needs besides the arrays: where the simulation stands."""

    seed: int
    zone: str
    reference_year: int
    first_day: str
    last_day: str
    signup_rate: float
    counters: dict[str, int] = field(default_factory=dict)
    version: int = STATE_VERSION
    world: str = ""
    """Made by each generate, recorded in the source beside the last committed day ("" before)."""
    files: dict[str, str] = field(
        default_factory=lambda: {name: f"{name}.parquet" for name in STATE_TABLES}
    )
    """The Parquet file of each state table (the defaults: states saved before files were named)."""


class StateDamaged(ValueError):
    """The saved generator state cannot be read back."""


def window_start(end_date: date, months: int) -> date:
    """First day of `months` months of history ending on `end_date` (inclusive)."""
    if months < 1:
        raise ValueError(f"months must be at least 1, got {months}")
    y, m = divmod(end_date.year * 12 + end_date.month - 1 - months, 12)
    m += 1
    day = min(end_date.day, calendar.monthrange(y, m)[1])
    return date(y, m, day) + timedelta(days=1)


class Simulation:
    """The whole synthetic world: users, their charges, pending refunds; advanced day by day."""

    def __init__(
        self, meta: Meta, pop: Population, charges: dict[str, np.ndarray], refunds: pa.Table
    ):
        self.meta = meta
        self.clock = BusinessClock(meta.zone)
        self.sim = DaySimulator(meta.seed, self.clock, meta.reference_year)
        self.pop = pop
        self.counters = Counters(**meta.counters) if meta.counters else Counters()
        self.charges = charges
        self.pending_refunds = refunds  # transaction_id, refund_us: refunds after the horizon

    @property
    def last_day(self) -> date:
        """The latest simulated business day."""
        return date.fromisoformat(self.meta.last_day)

    @classmethod
    def begin(
        cls, users: int, months: int, seed: int, end_date: date, zone: str
    ) -> tuple[Simulation, np.ndarray]:
        """A world before its first day, with the users who joined earlier; returns the sign-up plan."""
        if users < 1:
            raise ValueError(f"users must be at least 1, got {users}")
        start = window_start(end_date, months)
        meta = Meta(seed, zone, end_date.year, start.isoformat(), "", 0.0)
        sim = cls(meta, _empty_population(), {}, _empty_refunds())
        sim.meta.last_day = (start - timedelta(days=1)).isoformat()
        rng = np.random.default_rng([seed, 0, 7])
        n_days = (end_date - start).days + 1
        pre = max(1, round(users * PRE_WINDOW_SHARE)) if users > 1 else 1
        s0 = start.toordinal()
        days = np.sort(rng.integers(s0 - PRE_WINDOW_DAYS, s0, pre))
        instants = sim.clock.times_in_days(rng, days, HOURLY_APP)
        order = np.argsort(instants, kind="stable")
        pop = new_users(rng, 1, days[order], instants[order], meta.reference_year, s0 - 1)
        sim.sim.fill_churn_instants(rng, pop)
        sim.pop = pop
        sim.counters.user_id = pre + 1
        # Sign-ups grow over the window (marketing works), with a weekend bump.
        growth = 1.0 + np.arange(n_days) / max(n_days, 1)
        weekday = np.array([(start + timedelta(days=i)).weekday() for i in range(n_days)])
        weights = growth * np.where(weekday >= 5, 1.25, 1.0)
        plan = rng.multinomial(users - pre, weights / weights.sum())
        sim.meta.signup_rate = float(plan[-28:].mean())
        return sim, plan

    def run(self, plan: np.ndarray, horizon: date, chunk_days: int = 31) -> Iterator[Chunk]:
        """Simulate the planned days after last_day, yielding rows as they stand at `horizon`'s end."""
        horizon_us = self.clock.start_us(horizon.toordinal() + 1)
        first = self.last_day.toordinal() + 1
        block: list[tuple[int, object]] = []
        for i, signups in enumerate(plan):
            ordinal = first + i
            if signups:
                self.pop = self.sim.sign_up(self.pop, self.counters, ordinal, int(signups))
            block.append((ordinal, self.sim.simulate(self.pop, self.counters, ordinal)))
            self.meta.last_day = date.fromordinal(ordinal).isoformat()
            if len(block) == chunk_days or i == len(plan) - 1:
                yield self._chunk(block, horizon_us)
                block = []

    def _chunk(self, block: list, horizon_us: int) -> Chunk:
        """Turn simulated days into Arrow tables; keep what changes after the horizon."""
        txn = concat_columns([a.transactions for _, a in block])
        charges = concat_columns([a.charges for _, a in block])
        later = txn["refund_us"] >= horizon_us if txn else np.zeros(0, bool)
        if later.any():
            self.pending_refunds = pa.concat_tables(
                [
                    self.pending_refunds,
                    pa.table(
                        {
                            "transaction_id": txn["transaction_id"][later],
                            "refund_us": txn["refund_us"][later],
                        }
                    ),
                ]
            )
        if charges:
            self.charges = concat_columns([self.charges, charges])
        return Chunk(
            card_transactions=transactions_table(txn, horizon_us),
            topups=topups_table(concat_columns([a.topups for _, a in block])),
            deferred_charges=charges_table(charges, horizon_us),
            app_events=[(date.fromordinal(o), app_events_table(a.app_events, o)) for o, a in block],
            truth=truth_table(charges),
        )

    def users_table(self, horizon: date) -> pa.Table:
        """Every user as they stand at the end of `horizon`."""
        return users_table(self.pop, self.clock.start_us(horizon.toordinal() + 1))

    def save(self, folder: Path) -> None:
        """Persist everything `advance` needs (traits and state are evaluation-only truth).

        The tables go to files of new names and meta.json, which names them, is replaced last:
        a save that dies anywhere (killed, disk full) leaves the previous state whole.
        """
        from tasks.storage import fsync_folder, make_folders, write_file_atomically

        make_folders(folder)
        self.meta.counters = asdict(self.counters)
        generation = secrets.token_hex(6)
        tables = {
            "population": self.pop.to_arrow(),
            "charges": pa.table(self.charges or _EMPTY_CHARGES),
            "pending_refunds": self.pending_refunds,
        }
        files = {name: f"{name}.{generation}.parquet" for name in tables}
        for name, table in tables.items():
            write_file_atomically(folder / files[name], _parquet_writer(table))
        self.meta.files = files
        body = (json.dumps(asdict(self.meta), indent=2) + "\n").encode()
        write_file_atomically(folder / META_FILE, lambda handle: handle.write(body))
        _remove_unnamed(folder, set(files.values()))
        fsync_folder(folder)

    @classmethod
    def load(cls, folder: Path) -> Simulation:
        """Restore a saved simulation (StateDamaged, saying how to recover, if it is unreadable)."""
        meta_path = folder / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no generator state at {folder}: run `paylater demo-data generate` first"
                " (with --replace if the source already holds data)"
            )
        meta = _read_meta(meta_path)
        if meta.version != STATE_VERSION:
            raise ValueError(
                f"generator state at {folder} is version {meta.version}, saved by an older"
                f" release; this one reads version {STATE_VERSION} and cannot convert it: start"
                " the world again with `paylater demo-data generate --replace` (which replaces"
                " every source row)"
            )
        tables = {name: _read_state_table(folder, meta, name) for name in STATE_TABLES}
        try:
            pop = Population.from_arrow(tables["population"])
            charges_t = tables["charges"]
            charges = {
                c: np.array(charges_t.column(c).to_numpy(), copy=True)
                for c in charges_t.column_names
            }
        except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
            raise _damaged(folder, META_FILE, exc) from exc
        return cls(meta, pop, charges if len(charges_t) else {}, tables["pending_refunds"])


def _parquet_writer(table: pa.Table) -> Callable[[IO[bytes]], None]:
    """Write `table` as Parquet into an open file."""

    def write(handle: IO[bytes]) -> None:
        pq.write_table(table, handle)

    return write


def _remove_unnamed(folder: Path, keep: set[str]) -> None:
    """Delete state tables of earlier saves (write_file_atomically removes the temporary files
    of saves that died, once they are old enough not to be a live save's)."""
    for path in folder.iterdir():
        if path.suffix == ".parquet" and path.name not in keep:
            path.unlink(missing_ok=True)


def _damaged(folder: Path, name: str, exc: BaseException) -> StateDamaged:
    """The error for an unreadable state file, with the ways out."""
    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return StateDamaged(
        f"generator state at {folder} is damaged ({name}: {reason}). It cannot be rebuilt from"
        " the source: restore that folder from a backup, or start the world again with"
        " `paylater demo-data generate --replace` (which replaces every source row)"
    )


def _read_meta(path: Path) -> Meta:
    """meta.json, or StateDamaged if it is truncated, empty or not a state's."""
    try:
        body = json.loads(path.read_text())
        meta = Meta(**body)
        if set(meta.files) != set(STATE_TABLES):
            raise ValueError(f"names tables {sorted(meta.files)}, not {list(STATE_TABLES)}")
        date.fromisoformat(meta.last_day)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise _damaged(path.parent, path.name, exc) from exc
    return meta


def _read_state_table(folder: Path, meta: Meta, name: str) -> pa.Table:
    """One state table, or StateDamaged if its file is missing or unreadable."""
    path = folder / meta.files[name]
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(folder, path.name, exc) from exc


_EMPTY_CHARGES = {
    "charge_id": np.zeros(0, np.int64),
    "user_id": np.zeros(0, np.int64),
    "requested_us": np.zeros(0, np.int64),
    "amount_jpy": np.zeros(0, np.int64),
    "fee_jpy": np.zeros(0, np.int64),
    "due_day": np.zeros(0, np.int64),
    "repaid_us": np.zeros(0, np.int64),
    "days_late": np.zeros(0, np.int64),
    "default_us": np.zeros(0, np.int64),
    "default_probability": np.zeros(0, np.float64),
}


def _empty_refunds() -> pa.Table:
    """No pending refunds."""
    return pa.table(
        {"transaction_id": pa.array([], pa.int64()), "refund_us": pa.array([], pa.int64())}
    )


def _empty_population() -> Population:
    """A placeholder population with no users."""
    rng = np.random.default_rng(0)
    return new_users(rng, 1, np.zeros(0, np.int64), np.zeros(0, np.int64), 2000)


def generate(
    users: int, months: int, seed: int, end_date: date, zone: str = "Asia/Tokyo"
) -> SourceData:
    """Simulate `months` months ending on `end_date` for about `users` users, in memory (no I/O)."""
    sim, plan = Simulation.begin(users, months, seed, end_date, zone)
    chunks = list(sim.run(plan, end_date))
    app_events = [t for c in chunks for _, t in c.app_events]
    return SourceData(
        users=sim.users_table(end_date),
        card_transactions=pa.concat_tables([c.card_transactions for c in chunks]),
        topups=pa.concat_tables([c.topups for c in chunks]),
        deferred_charges=pa.concat_tables([c.deferred_charges for c in chunks]),
        app_events=pa.concat_tables(app_events),
        truth=pa.concat_tables([c.truth for c in chunks]),
    )
