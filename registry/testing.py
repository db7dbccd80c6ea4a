"""Synthetic training datasets in the contract's shape, with a known default function (tests, bench)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paylater.product import FEE_SCHEDULE_JPY, MAX_AMOUNT_JPY, MIN_AMOUNT_JPY

USER_FEATURES = (
    "txn_count_30d",
    "txn_amount_30d_jpy",
    "topup_count_90d",
    "days_since_signup",
    "late_repayments_365d",
    "balance_avg_30d_jpy",
)
SQL_HASH = "synthetic-sql-hash"
_TEMPLATE_DIR = Path(tempfile.gettempdir()) / "paylater-test-templates"


def _fees(amounts: np.ndarray) -> np.ndarray:
    """paylater.product.fee_for, vectorised."""
    uppers = np.array([u for u, _ in FEE_SCHEDULE_JPY])
    fees = np.array([f for _, f in FEE_SCHEDULE_JPY])
    return fees[np.searchsorted(uppers, amounts, side="left")]


def synthetic_training_table(
    rows: int, first_month: date, months: int, seed: int = 7
) -> tuple[pa.Table, np.ndarray]:
    """(training table, true default probability per row) over `months` request months."""
    rng = np.random.default_rng(seed)
    users = max(rows // 4, 1)
    user_id = rng.integers(1, users + 1, rows)
    month_index = rng.integers(0, months, rows)
    day = rng.integers(0, 28, rows)
    request_date = np.array(
        [np.datetime64(first_month, "M") + int(m) for m in month_index], dtype="datetime64[D]"
    ) + day.astype("timedelta64[D]")
    txn_count = rng.poisson(12, rows)
    txn_amount = txn_count * rng.gamma(2.0, 1500.0, rows)
    topups = rng.poisson(3, rows)
    tenure = rng.integers(1, 1500, rows)
    late = rng.poisson(0.4, rows)
    balance = rng.gamma(2.0, 4000.0, rows)
    amount = np.clip(
        (rng.lognormal(9.3, 0.7, rows) // 100) * 100, MIN_AMOUNT_JPY, MAX_AMOUNT_JPY
    ).astype(np.int64)
    logit = (
        -2.2
        + 1.0 * late
        - 0.8 * np.log1p(balance / 1000.0)
        - 0.4 * np.log1p(tenure / 100.0)
        + 0.9 * (amount / 20_000.0)
        - 0.15 * np.minimum(topups, 8)
        + 0.6 * (txn_count < 8)
    )
    truth = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(rows) < truth).astype(np.int8)
    balance_nullable = np.where(rng.random(rows) < 0.05, np.nan, balance)
    requested_at = [datetime.combine(d.astype(date), time(3, 0), tzinfo=UTC) for d in request_date]
    order = np.argsort(request_date, kind="stable")
    table = pa.table(
        {
            "charge_id": pa.array(np.arange(1, rows + 1), pa.int64()),
            "user_id": pa.array(user_id[order], pa.int64()),
            "requested_at": pa.array(
                [requested_at[i] for i in order], pa.timestamp("us", tz="UTC")
            ),
            "request_date": pa.array(request_date[order], pa.date32()),
            "label_default": pa.array(label[order], pa.int8()),
            "request_amount_jpy": pa.array(amount[order], pa.int64()),
            "request_fee_jpy": pa.array(_fees(amount)[order], pa.int64()),
            "txn_count_30d": pa.array(txn_count[order], pa.int64()),
            "txn_amount_30d_jpy": pa.array(txn_amount[order], pa.float64()),
            "topup_count_90d": pa.array(topups[order], pa.int64()),
            "days_since_signup": pa.array(tenure[order], pa.int64()),
            "late_repayments_365d": pa.array(late[order], pa.int64()),
            "balance_avg_30d_jpy": pa.array(
                balance_nullable[order], pa.float64(), from_pandas=True
            ),
        }
    )
    return table, truth[order]


def as_of_after(first_month: date, months: int) -> date:
    """A business date by which every one of the `months` request months has matured."""
    last = np.datetime64(first_month, "M") + months - 1
    due = (last + 1).astype("datetime64[D]") + np.timedelta64(26, "D")
    return due.astype(date) + timedelta(days=31)


def scramble_labels_before(table: pa.Table, month: date, seed: int = 1) -> pa.Table:
    """The table with labels shuffled in every request month before `month` (a model that learns nothing)."""
    rng = np.random.default_rng(seed)
    dates = np.asarray(table["request_date"].to_numpy(zero_copy_only=False), dtype="datetime64[D]")
    early = dates < np.datetime64(month, "D")
    label = np.asarray(table["label_default"].to_numpy(zero_copy_only=False)).copy()
    label[early] = rng.permutation(label[early])
    index = table.column_names.index("label_default")
    return table.set_column(index, "label_default", pa.array(label, pa.int8()))


def write_dataset(table: pa.Table, as_of: date, url: str | None = None) -> Any:
    """Store `table` as the training dataset of `as_of` at `url` (default: the settings') via tasks.datasets."""
    from tasks.datasets import write_dataset as store
    from tasks.storage import open_storage

    return store(
        open_storage(url),
        "training",
        as_of,
        table,
        features=["request_amount_jpy", "request_fee_jpy", *USER_FEATURES],
        sql_hash=SQL_HASH,
        source_watermark=None,
    )


def write_truth(table: pa.Table, truth: np.ndarray, home: Path) -> Path:
    """The generator's true default probabilities at <home>/truth/deferred_charges.parquet."""
    path = home / "truth" / "deferred_charges.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"charge_id": table["charge_id"], "default_probability": pa.array(truth)}), path
    )
    return path


def cached_template(name: str, build: Callable[[Path], None]) -> Path:
    """The file `name` in this machine's template folder, built once by `build(scratch)` into a
    scratch file and published atomically, so concurrent builders each publish a whole file."""
    template = _TEMPLATE_DIR / name
    if not template.is_file():
        _TEMPLATE_DIR.mkdir(parents=True, exist_ok=True)
        scratch = _TEMPLATE_DIR / f"building-{os.getpid()}-{name}"
        build(scratch)
        os.replace(scratch, template)
    return template


def empty_mlflow_db(target: Path) -> str:
    """A migrated, empty MLflow sqlite store at `target`: migrations (~10 s) run once, then copies."""
    import mlflow

    def migrate(scratch: Path) -> None:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{scratch}").search_experiments()

    template = cached_template(f"mlflow-{mlflow.__version__}.db", migrate)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def stage_as_retrain(version: str) -> None:
    """What monthly_retrain does for a candidate that passed its gates (against today's
    production): record the pass, stage it."""
    from registry import policy

    production = policy.alias_version(policy.client(), "production")
    decision = policy.GateDecision(True, [], production_version=production)
    policy.record_gate(version, decision, "monthly-retrain")
    policy.stage_candidate(version, "monthly-retrain", "gates passed")
