"""Synthetic operational data of the prepaid card: a product feature, since there is no real data.

A day-by-day simulation, vectorised over users (numpy), driven by latent per-user traits (income and
payday, financial stress, impulsiveness, engagement) plus stress shocks. It writes the four source
tables, the app events (straight into the warehouse) and, apart from both, each deferred charge's
true default probability (`$PAYLATER_HOME/truth/deferred_charges.parquet`: charge_id,
default_probability). The true log-odds are `datagen.simulate.default_logit` of the user's state at
request time as the source tables show it up to the day before (30- and 7-day windows of spend vs
top-ups, top-up cadence and recency, declines, past lateness, fading app use, the amount against the
inflow), plus a small direct part of latent stress that no lender observes.
Same seed and arguments give identical rows.

Public API (no I/O unless named so):

- `generate(users, months, seed, end_date, zone="Asia/Tokyo") -> SourceData`: simulate in memory.
  `SourceData` holds Arrow tables `users`, `card_transactions`, `topups`, `deferred_charges`,
  `app_events` (warehouse types: timestamp[us, UTC], date32, int64) and `truth`.
- `load(source_url, data, replace=False) -> dict[str, int]`: bulk-load the four source tables into
  `sqlite:///path` (ADBC ingest) or `postgresql://...` (COPY); creates the schema; refuses a
  non-empty source unless `replace`.
- `write_app_events(warehouse_url, table) -> int`: replace the warehouse's app_events partition of
  every business day in `table`.
- `generate_into(...)` / `advance_into(days, source_url, warehouse_url, truth_dir)`: what
  `paylater demo-data generate` and `advance` run (streamed loading, state kept in truth/generator
  and saved atomically; each day's rows committed with its `datagen_progress` record, so an
  advance resumes after a crash at any point; a database or disk failure part-way is
  `AdvanceStopped`, naming the last day the source holds).
- `default_logit(...)`: the known function behind the truth.
"""

from __future__ import annotations

from datagen.generator import SourceData, generate
from datagen.load import SourceNotEmpty, SourceUnavailable
from datagen.pipeline import advance_into, generate_into, load, write_app_events
from datagen.simulate import default_logit

__all__ = [
    "SourceData",
    "SourceNotEmpty",
    "SourceUnavailable",
    "advance_into",
    "default_logit",
    "generate",
    "generate_into",
    "load",
    "write_app_events",
]
